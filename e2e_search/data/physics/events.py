"""Process ``event_objects``: events as padded lists of reconstructed objects (HIGGS-benchmark style).

Signal (y=1): semileptonic top-pair events; background (y=0): W+jets with W -> e/mu nu.
Objects per event (``X_objects`` (N, 6, 4) = pt, eta, phi, b-tag; ``mask`` (N, 6)):
  0 the hardest lepton (e or mu, pT > 20 GeV, |eta| < 2.5)
  1 missing transverse momentum (pT, 0, phi, 0), from the neutrinos, smeared by 10%
  2-5 up to four anti-kT R = 0.4 jets (pT > 25 GeV, |eta| < 2.5, away from the lepton), pT-ordered;
      b-tag 1 with 70% efficiency for jets with a b hadron within 0.4, 1% otherwise.
``X_features`` (N, 21) holds the same numbers flat, like the HIGGS data set's 21 low-level features.
Truth per event: ``n_b`` (N,) float32, how many of the (up to four) jets hold a b hadron within 0.4 (what the
b-tag measures with 70% efficiency; a regression target for a second task head), ``object_type`` (N, 6) int8
(0 lepton, 1 missing pT, 2 jet).
"""

from __future__ import annotations

import awkward as ak
import numpy as np

from e2e_search.data.physics.clustering import Batch
from e2e_search.data.physics.detector import wrap
from e2e_search.data.physics.sample import COMMON, Sample
from trainables.data.object_names import EVENT_FEATURES, EVENT_OBJECTS

N_OBJECTS = len(EVENT_OBJECTS)
N_FEATURES = len(EVENT_FEATURES)
TTBAR = ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on"]
WJETS = ["WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on", "PhaseSpace:pTHatMin = 40.",
         "24:onMode = off", "24:onIfAny = 11 13"]


def event_samples(counts: list[int]) -> list[Sample]:
    """``counts``: events of label 0 (W+jets) and 1 (top pairs)."""
    return [Sample("ttbar", COMMON + TTBAR, counts[1], None, {"y": 1}),
            Sample("wjets", COMMON + WJETS, counts[0], None, {"y": 0})]


def _is_b_hadron(aid):
    return ((aid // 100) % 10 == 5) | ((aid // 1000) % 10 == 5)


def event_rows(smp: Sample, events, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    b = Batch(events, radius=0.4, jet_pt_min=25.0)
    prt = b.prt
    fs = prt[prt.status > 0]
    lep = fs[((abs(fs.id) == 11) | (abs(fs.id) == 13)) & (fs.p.pt > 20) & (abs(fs.p.eta) < 2.5)]
    lep = lep[ak.argsort(lep.p.pt, ascending=False)]
    has_lep = (ak.num(lep) > 0).to_numpy()
    l1 = ak.firsts(ak.pad_none(lep, 1, axis=1))
    l_pt = ak.fill_none(l1.p.pt, 0.0).to_numpy()
    l_eta = ak.fill_none(l1.p.eta, 0.0).to_numpy()
    l_phi = ak.fill_none(l1.p.phi, 0.0).to_numpy()
    jets = b.jets
    away = np.hypot(jets.eta - l_eta, wrap(jets.phi - l_phi)) > 0.4
    jets = jets[(abs(jets.eta) < 2.5) & away]
    enough = (ak.num(jets) >= 2).to_numpy()
    keep = np.nonzero(has_lep & enough)[0]
    if len(keep) == 0:
        return None
    nu = b.invisible
    met_x = ak.sum(nu.p.px, axis=1).to_numpy() * rng.normal(1, 0.1, len(nu))
    met_y = ak.sum(nu.p.py, axis=1).to_numpy() * rng.normal(1, 0.1, len(nu))
    bh = prt[_is_b_hadron(abs(prt.id))]
    j4 = ak.pad_none(jets[:, :4], 4, axis=1, clip=True)
    X = np.zeros((len(events), N_OBJECTS, N_FEATURES), np.float32)
    n_b = np.zeros(len(events), np.float32)
    mask = np.zeros((len(events), N_OBJECTS), np.uint8)
    X[:, 0] = np.stack([l_pt, l_eta, l_phi, np.zeros_like(l_pt)], 1)
    mask[:, 0] = has_lep
    X[:, 1] = np.stack([np.hypot(met_x, met_y), np.zeros_like(met_x), np.arctan2(met_y, met_x), np.zeros_like(met_x)], 1)
    mask[:, 1] = 1
    for k in range(4):
        jk = j4[:, k]
        present = ~ak.is_none(jk).to_numpy()
        eta = ak.fill_none(jk.eta, 0.0).to_numpy()
        phi = ak.fill_none(jk.phi, 0.0).to_numpy()
        near_b = ak.any(np.hypot(bh.p.eta - eta, wrap(bh.p.phi - phi)) < 0.4, axis=1).to_numpy()
        tag = rng.random(len(events)) < np.where(near_b, 0.7, 0.01)
        n_b += near_b & present
        X[:, 2 + k] = np.stack([ak.fill_none(jk.pt, 0.0).to_numpy(), eta, phi, tag & present], 1) * present[:, None]
        mask[:, 2 + k] = present
    flat = np.concatenate([X[:, 0, :3], X[:, 1, [0, 2]], X[:, 2:].reshape(len(events), -1)], axis=1)
    types = np.array([0, 1, 2, 2, 2, 2], np.int8)
    return {"X_objects": X[keep], "mask": mask[keep], "object_type": np.tile(types, (len(keep), 1)),
            "X_features": flat[keep].astype(np.float32), "n_b": n_b[keep], "y": np.full(len(keep), smp.extra["y"], np.int64)}
