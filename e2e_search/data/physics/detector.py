"""E2E-style jet images from final-state particles (an approximation, not CMS full simulation).

Geometry: pixels of 0.0174 in eta x 2*pi/360 in phi (one ECAL crystal), a
window of ``size`` x ``size`` pixels centred on the jet axis. Charged particles
bend in phi by asin(0.735 / pT) * charge at the ECAL face (3.8 T, R = 1.29 m).

Channels (any subset, any order):
  ECAL    photons and electrons: energy, resolution 2.8%/sqrt(E) (+) 0.3%
  HCAL    hadrons: energy summed in 5x5-crystal towers, 100%/sqrt(E) (+) 5%
  Tracks  charged particles with pT > 0.5 GeV: pT
Every calorimeter pixel gets Gaussian noise, then zero suppression.
"""

from __future__ import annotations

import awkward as ak
import numpy as np

CHANNELS = ("ECAL", "HCAL", "Tracks")
ETA_PIX = 0.0174
PHI_PIX = 2 * np.pi / 360
BEND = 0.735  # GeV: 0.3 * B[T] * R[m] / 2 with B = 3.8 T, R = 1.29 m
NOISE = {"ECAL": 0.05, "HCAL": 0.2}  # GeV per pixel
ZERO_SUPPRESS = {"ECAL": 0.15, "HCAL": 0.6, "Tracks": 0.5}

# Charge of the long-lived particles a Pythia final state holds (by PDG id; others neutral).
_POSITIVE = {211, 321, 2212, 3222, -11, -13, -3112, -3312, -3334, -15}
_NEGATIVE = {-211, -321, -2212, -3222, 11, 13, 3112, 3312, 3334, 15}
NEUTRINOS = (12, 14, 16)


def charge_of(pid: np.ndarray) -> np.ndarray:
    q = np.zeros(pid.shape, np.int8)
    q[np.isin(pid, list(_POSITIVE))] = 1
    q[np.isin(pid, list(_NEGATIVE))] = -1
    return q


def wrap(dphi):
    return (dphi + np.pi) % (2 * np.pi) - np.pi


def jet_images(particles: ak.Array, jet_eta: np.ndarray, jet_phi: np.ndarray, *, channels: list[str],
               size: int, rng: np.random.Generator) -> np.ndarray:
    """(n_jets, size, size, C) channels-last float32 images.

    ``particles``: one list per jet of visible final-state particles with fields
    ``id``, ``pt``, ``eta``, ``phi``, ``e`` (all particles of the event: the
    image shows everything in the window, as a detector would).
    """
    n = len(jet_eta)
    counts = ak.num(particles.id).to_numpy()
    owner = np.repeat(np.arange(n), counts)
    pid = ak.flatten(particles.id).to_numpy().astype(np.int64)
    pt = ak.flatten(particles.pt).to_numpy()
    eta = ak.flatten(particles.eta).to_numpy()
    phi = ak.flatten(particles.phi).to_numpy()
    e = ak.flatten(particles.e).to_numpy()
    q = charge_of(pid)
    bend = np.where(q != 0, np.arcsin(np.clip(BEND / np.maximum(pt, 1e-3), 0, 1)) * q, 0.0)
    # Particles curling up before the ECAL (pT < 0.735 GeV) never reach it.
    reaches = (q == 0) | (pt > BEND)
    ieta = np.floor((eta - jet_eta[owner]) / ETA_PIX + size / 2).astype(np.int64)
    iphi = np.floor(wrap(phi + bend - jet_phi[owner]) / PHI_PIX + size / 2).astype(np.int64)
    inside = reaches & (ieta >= 0) & (ieta < size) & (iphi >= 0) & (iphi < size)
    apid = np.abs(pid)
    is_em = (apid == 22) | (apid == 11)
    is_had = ~is_em & (apid != 13) & ~np.isin(apid, NEUTRINOS)
    out = np.zeros((n, size, size, len(channels)), np.float32)
    for c, name in enumerate(channels):
        if name == "ECAL":
            sel = inside & is_em
            val = e[sel] * (1 + rng.normal(0, 1, sel.sum()) * np.hypot(0.028 / np.sqrt(np.maximum(e[sel], 1e-3)), 0.003))
            np.add.at(out[..., c], (owner[sel], ieta[sel], iphi[sel]), np.maximum(val, 0))
        elif name == "HCAL":
            sel = inside & is_had
            val = e[sel] * (1 + rng.normal(0, 1, sel.sum()) * np.hypot(1.0 / np.sqrt(np.maximum(e[sel], 1e-3)), 0.05))
            te, tp = (ieta[sel] // 5) * 5 + 2, (iphi[sel] // 5) * 5 + 2  # tower centres
            ok = (te < size) & (tp < size)
            np.add.at(out[..., c], (owner[sel][ok], te[ok], tp[ok]), np.maximum(val[ok], 0))
        elif name == "Tracks":
            sel = inside & (q != 0) & (pt > 0.5)
            np.add.at(out[..., c], (owner[sel], ieta[sel], iphi[sel]), pt[sel])
        else:
            raise ValueError(f"unknown channel '{name}' (known: {', '.join(CHANNELS)})")
        if name in NOISE:
            out[..., c] += rng.normal(0, NOISE[name], out[..., c].shape).astype(np.float32)
        out[..., c][out[..., c] < ZERO_SUPPRESS[name]] = 0
    return out
