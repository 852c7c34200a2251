"""Simulated physics data: Pythia 8 collisions, FastJet jets, E2E-style detector images."""
