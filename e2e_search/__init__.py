"""e2e-search: architecture search for end-to-end particle-physics reconstruction."""

__version__ = "0.1.0"
