"""Few labels: the labelled training events of a trial with ``label_fraction`` < 1 (trainables/params.py).

Masked pretraining pays where labels are few and unlabelled events many (He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners"; Golling et al. 2024, "Masked particle modeling on sets"). A trial with
``label_fraction`` f pretrains (``pretrain_epochs``) on every training event without its label, then trains its
task heads on the first ``round(f * n_train)`` events of the split's **label order**:

- the order is fixed by the data (``DataSetup.label_order``, drawn with ``data.seed`` when the search inspects the
  file): every trial, arm and seed of a search sees the same labelled events for the same fraction, and the
  events labelled at 1% are among those labelled at 10%;
- it is stratified by class: each class's events, shuffled, are interleaved by their rank within the class
  (event i of a class of n sits at (i + 0.5) / n), so any prefix holds each class in its share of the split.

A task epoch then runs as many optimizer steps as one over the whole training split (the labelled events cycled,
reshuffled every epoch): arms with and without pretraining, at any fraction, get the same steps per epoch and the
same learning-rate schedule; the best epoch (on the full validation split) guards against over-fitting.
"""

from __future__ import annotations

import math

import numpy as np


def label_order(train: list[int], labels: np.ndarray | None, seed: int) -> list[int]:
    """The training indices in label order (see the module): stratified by ``labels`` (one class per training
    event, in ``train``'s order) when given, else one seeded shuffle."""
    rng = np.random.default_rng(seed + 7)
    idx = np.asarray(train, np.int64)
    if labels is None or len(idx) == 0:
        return idx[rng.permutation(len(idx))].tolist()
    labels = np.asarray(labels)
    keys = np.empty(len(idx), np.float64)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        ranks = np.empty(len(members), np.float64)
        ranks[rng.permutation(len(members))] = (np.arange(len(members)) + 0.5) / len(members)
        keys[members] = ranks
    order = np.lexsort((labels, keys))  # by position in the class, ties by class
    return idx[order].tolist()


def labelled_count(n_train: int, fraction: float) -> int:
    """How many training events carry their label at ``fraction`` (0, 1]: round(fraction * n), at least 1."""
    return max(1, min(n_train, int(round(fraction * n_train))))


def labelled_events(order: list[int], fraction: float) -> list[int]:
    """The labelled training events at ``fraction``: the first :func:`labelled_count` of the label order."""
    return sorted(order[:labelled_count(len(order), fraction)])


def cycled(events: list[int], length: int, seed: int) -> list[int]:
    """``events`` repeated to ``length`` entries (every event ``floor`` or ``ceil`` times; the loader shuffles)."""
    reps = math.ceil(length / max(1, len(events)))
    out = np.tile(np.asarray(events, np.int64), reps)
    return np.random.default_rng(seed).permutation(out)[:length].tolist() if reps > 1 else list(events)[:length]
