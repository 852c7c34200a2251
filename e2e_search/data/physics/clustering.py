"""A batch of Pythia events clustered into anti-kT jets (FastJet), and the jet lookups the selections use.

Momenta are ``vector`` Momentum4D records (GeV); jets come pt-ordered per event.
"""

from __future__ import annotations

import awkward as ak
import numpy as np
import vector

from e2e_search.data.physics.detector import NEUTRINOS, wrap

vector.register_awkward()

JET_R = 0.8
JET_PT_MIN = 300.0
JET_ETA_MAX = 1.4


class Batch:
    """A batch of Pythia events, clustered: per event the visible final state and its jets (pt-ordered)."""

    def __init__(self, events: ak.Array, *, radius: float = JET_R, jet_pt_min: float = JET_PT_MIN):
        import fastjet

        prt = events.prt
        self.prt = prt
        fs = prt[prt.status > 0]
        afs = abs(fs.id)
        vis = fs[(afs != NEUTRINOS[0]) & (afs != NEUTRINOS[1]) & (afs != NEUTRINOS[2])]
        self.visible = ak.zip({"id": vis.id, "pt": vis.p.pt, "eta": vis.p.eta, "phi": vis.p.phi, "e": vis.p.e})
        self.invisible = fs[(afs == NEUTRINOS[0]) | (afs == NEUTRINOS[1]) | (afs == NEUTRINOS[2])]
        mom = ak.zip({"px": vis.p.px, "py": vis.p.py, "pz": vis.p.pz, "E": vis.p.e})
        cs = fastjet.ClusterSequence(mom, fastjet.JetDefinition(fastjet.antikt_algorithm, radius))
        jets = ak.zip({k: v for k, v in zip(["px", "py", "pz", "E"], ak.unzip(cs.inclusive_jets(min_pt=jet_pt_min)))},
                      with_name="Momentum4D")
        nconst = ak.num(cs.constituents(min_pt=jet_pt_min), axis=2)
        order = ak.argsort(jets.pt, ascending=False)
        self.jets = jets[order]
        self.nconst = nconst[order]

    def __len__(self) -> int:
        return len(self.prt)

    def leading(self, eta_max: float = JET_ETA_MAX) -> np.ndarray:
        """Index of the leading jet per event if it is central enough, else -1."""
        has = ak.num(self.jets) > 0
        first_eta = ak.fill_none(ak.firsts(abs(self.jets.eta)), 99.0)
        return np.where(has.to_numpy() & (first_eta.to_numpy() < eta_max), 0, -1)

    def nearest_jet(self, eta, phi, r_max: float, eta_max: float = JET_ETA_MAX) -> np.ndarray:
        """Per event, index of the jet nearest to (eta, phi) within r_max, else -1."""
        dr = np.hypot(self.jets.eta - eta, wrap(self.jets.phi - phi))
        dr = ak.where(abs(self.jets.eta) < eta_max, dr, 99.0)
        best = ak.fill_none(ak.argmin(dr, axis=1), -1).to_numpy()
        mind = ak.fill_none(ak.min(dr, axis=1), 99.0).to_numpy()
        return np.where(mind < r_max, best, -1)


def jet_at(batch: Batch, idx: np.ndarray):
    """The chosen jet of each event (events with idx -1 get jet 0 as a placeholder)."""
    padded = ak.pad_none(batch.jets, 1, axis=1)
    return padded[np.arange(len(idx)), np.maximum(idx, 0)]
