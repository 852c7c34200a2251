"""Simulated processes: Pythia 8 settings and the selection of one jet (or event) per collision.

Each process is a list of *samples* (a Pythia configuration and what to keep of
its events); a generation task runs each sample until it has its share. The sample type is
:mod:`.sample`'s, the clustered batch of events :mod:`.clustering`'s, the ``event_objects`` samples :mod:`.events`'.
"""

from __future__ import annotations

import awkward as ak
import numpy as np

from e2e_search.data.physics.clustering import JET_R, Batch, jet_at
from e2e_search.data.physics.detector import wrap
from e2e_search.data.physics.events import event_samples
from e2e_search.data.physics.sample import COMMON, Sample

HARD = ["PhaseSpace:pTHatMin = 400."]
TOP = ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "24:onMode = off", "24:onIfAny = 1 2 3 4 5"]
QCD = ["HardQCD:all = on"]
PROCESSES = ("top_vs_qcd", "quark_vs_gluon", "boosted_scalar", "event_objects")


def scalar_settings(mass: float, decay: str) -> list[str]:
    width = max(5.0, 0.2 * mass)
    pair = {"bb": "5 -5", "gammagamma": "22 22"}[decay]
    return ["Higgs:useBSM = on", "HiggsBSM:gg2A3g(l:t) = on", "HiggsBSM:qg2A3q(l:t) = on",
            "HiggsBSM:qqbar2A3g(l:t) = on", f"36:m0 = {mass:.3f}", f"36:mMin = {max(1.0, mass - width):.3f}",
            f"36:mMax = {mass + width:.3f}", "36:onMode = off", f"36:onIfMatch = {pair}"]


def _partons_near(batch: Batch, mask, jet_idx: np.ndarray, r: float) -> np.ndarray:
    prt = batch.prt
    sel = prt[mask]
    jet = jet_at(batch, jet_idx)
    ok = jet_idx >= 0
    if not ok.any():
        return np.zeros(len(jet_idx), np.int64)
    dr = np.hypot(sel.p.eta - ak.fill_none(jet.eta, 0), wrap(sel.p.phi - ak.fill_none(jet.phi, 0)))
    return np.where(ok, ak.sum(dr < r, axis=1).to_numpy(), 0)


def select_top(batch: Batch) -> dict[str, np.ndarray]:
    """Leading jet containing a hadronic top: two W-daughter quarks and a top-daughter b within R."""
    prt = batch.prt
    aid = abs(prt.id)
    mother = abs(prt.id[ak.where(prt.mother1 >= 0, prt.mother1, 0)])
    lead = batch.leading()
    w_quarks = _partons_near(batch, (aid >= 1) & (aid <= 5) & (mother == 24), lead, JET_R)
    b_quarks = _partons_near(batch, (aid == 5) & (mother == 6), lead, JET_R)
    keep = (lead >= 0) & (w_quarks >= 2) & (b_quarks >= 1)
    return {"keep": keep, "jet": lead, "y": np.ones(len(batch), np.int64), "parton": np.full(len(batch), 6)}


def select_qcd(batch: Batch) -> dict[str, np.ndarray]:
    lead = batch.leading()
    return {"keep": lead >= 0, "jet": lead, "y": np.zeros(len(batch), np.int64), "parton": _hard_parton(batch, lead)}


def _hard_parton(batch: Batch, jet_idx: np.ndarray) -> np.ndarray:
    """PDG id of the outgoing hard-process parton nearest to the jet (0 if none within 0.8)."""
    prt = batch.prt
    hard = prt[prt.status == -23]
    jet = jet_at(batch, jet_idx)
    dr = np.hypot(hard.p.eta - ak.fill_none(jet.eta, 0), wrap(hard.p.phi - ak.fill_none(jet.phi, 0)))
    near = ak.fill_none(ak.argmin(dr, axis=1), 0).to_numpy()
    pid = ak.fill_none(ak.pad_none(hard.id, 1, axis=1)[np.arange(len(jet_idx)), near], 0).to_numpy()
    mind = ak.fill_none(ak.min(dr, axis=1), 99.0).to_numpy()
    return np.where((jet_idx >= 0) & (mind < JET_R), pid, 0)


def select_quark_gluon(batch: Batch) -> dict[str, np.ndarray]:
    """Leading jet labelled by its initiating hard parton: 0 quark (|id| <= 5), 1 gluon (id 21)."""
    lead = batch.leading()
    parton = _hard_parton(batch, lead)
    quark = (np.abs(parton) >= 1) & (np.abs(parton) <= 5)
    gluon = parton == 21
    return {"keep": (lead >= 0) & (quark | gluon), "jet": lead, "y": gluon.astype(np.int64), "parton": parton}


def select_scalar(batch: Batch) -> dict[str, np.ndarray]:
    """The jet nearest to the scalar A within R that contains both its decay products; truth mass of A."""
    prt = batch.prt
    a = prt[prt.id == 36]
    last = ak.firsts(a[:, -1:])
    has = ~ak.is_none(last).to_numpy()
    eta = ak.fill_none(last.p.eta, 0.0)
    phi = ak.fill_none(last.p.phi, 0.0)
    idx = np.where(has, batch.nearest_jet(eta, phi, JET_R), -1)
    # Both decay products of A inside the jet (a fully contained, "boosted" decay).
    mother = prt.id[ak.where(prt.mother1 >= 0, prt.mother1, 0)]
    daughters = (mother == 36) & (prt.id != 36)
    idx = np.where(_partons_near(batch, daughters, idx, JET_R) >= 2, idx, -1)
    m_true = ak.fill_none(last.m, 0.0).to_numpy()
    return {"keep": idx >= 0, "jet": idx, "y": np.zeros(len(batch), np.int64), "m_true": m_true.astype(np.float32),
            "parton": np.full(len(batch), 36)}


CLASSIFICATION = ("top_vs_qcd", "quark_vs_gluon", "event_objects")
"""Processes whose examples are labelled 0/1, half each; ``boosted_scalar`` is a regression sample."""


def class_counts(process: str, n: int) -> list[int]:
    """Examples per label (0, 1) that make ``n`` class-balanced (label 1 takes an odd one); ``[n]`` for regression."""
    return [n // 2, n - n // 2] if process in CLASSIFICATION else [n]


def split_counts(counts: list[int], workers: int) -> list[list[int]]:
    """Each class's count spread over ``workers`` as evenly as possible: every worker's share keeps the classes'
    proportions, and the remainders of different classes go to different workers (so ``--n 4 --workers 8`` gives
    two workers one top jet each and two others one QCD jet each, not four top jets)."""
    out = [[0] * len(counts) for _ in range(workers)]
    offset = 0
    for c, k in enumerate(counts):
        for i in range(workers):
            out[i][c] = k // workers + (1 if (i - offset) % workers < k % workers else 0)
        offset = (offset + k % workers) % workers
    return out


def samples(process: str, counts: list[int], *, rng: np.random.Generator,
            mass_range: tuple[float, float] = (50.0, 250.0), decay: str = "bb", per_mass: int = 200) -> list[Sample]:
    """The samples of ``process`` that make up ``counts`` examples (per label, see ``class_counts``)."""
    if process == "top_vs_qcd":
        return [Sample("top", COMMON + HARD + TOP, counts[1], select_top),
                Sample("qcd", COMMON + HARD + QCD, counts[0], select_qcd)]
    if process == "quark_vs_gluon":  # one Pythia sample, kept up to each label's count
        return [Sample("quark_gluon", COMMON + HARD + QCD, sum(counts), select_quark_gluon,
                       {"balance": {0: counts[0], 1: counts[1]}})]
    if process == "boosted_scalar":
        if per_mass <= 0:
            raise ValueError(f"per_mass must be > 0 (got {per_mass})")
        out, left = [], sum(counts)
        while left > 0:
            m = float(rng.uniform(*mass_range))
            k = min(per_mass, left)
            out.append(Sample(f"A{m:.1f}", COMMON + HARD + scalar_settings(m, decay), k, select_scalar))
            left -= k
        return out
    if process == "event_objects":
        return event_samples(counts)
    raise ValueError(f"unknown process '{process}'")
