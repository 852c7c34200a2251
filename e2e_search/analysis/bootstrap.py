"""Bootstrap intervals and paired comparisons of test metrics (numpy only, vectorized over replicates).

A replicate draws the n test events with replacement. It is held as per-event counts, a (b, n) block of
replicates at a time, and each metric is a weighted version of the one in trainables/metrics.py computed on
the whole block at once (with every count 1 it gives exactly that metric). Every model compared is scored on
the **same** replicates (the same resampled events): differences between models are then paired, and
:func:`prob_better` is the probability that one model's metric beats another's.

Metrics (the suffix after ``test_``): ``auc`` (binary, or one-vs-rest macro for K > 2 classes), ``acc``,
``rej30``/``rej50``/``rej70`` (1/FPR at that signal efficiency, two classes), ``mae``, ``bias``, ``abs_bias``,
``resolution`` (regression, target units).

Seeds: a finalist trained with S seeds gets, per replicate, the mean over S seeds drawn with replacement
(:func:`seed_mean`), so its interval holds both the test sample's and the training seed's variance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from trainables.metrics import EFFICIENCIES, softmax

REPLICATES = 1000
LEVEL = 0.95
BLOCK = 4_000_000
"""Counts held at once (replicates x events): 32 MB of float64."""
CLASSIFICATION = {"auc", "acc", *(f"rej{round(e * 100)}" for e in EFFICIENCIES)}
REGRESSION = {"mae", "bias", "abs_bias", "resolution"}
SUPPORTED = CLASSIFICATION | REGRESSION


def base_name(metric: str) -> str:
    """``test_auc`` / ``val_auc`` / ``auc`` -> ``auc``."""
    for prefix in ("test_", "val_"):
        if metric.startswith(prefix):
            return metric[len(prefix):]
    return metric


@dataclass
class View:
    """One model's predictions on the test events (in a common order), reduced to what a metric needs.

    Classification: ``prob`` (n, K) class probabilities and ``labels`` (n,) int; regression: ``pred`` and
    ``true`` (n,) in target units."""

    prob: np.ndarray | None = None
    labels: np.ndarray | None = None
    pred: np.ndarray | None = None
    true: np.ndarray | None = None
    _groups: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        assert self.true is not None  # a View holds labels (classification) or true values (regression)
        return len(self.true)

    def groups(self, score_col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order ascending by score, start of each group of equal scores in that order, positives in order)."""
        if score_col not in self._groups:
            assert self.prob is not None and self.labels is not None  # only a classification View is grouped
            s = self.prob[:, score_col]
            order = np.argsort(s, kind="mergesort")
            ss = s[order]
            starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
            self._groups[score_col] = (order, starts, (self.labels[order] == score_col).astype(np.float64))
        return self._groups[score_col]


def view(pred: dict, metric: str) -> View:
    """A ``load_scored`` dict (core/scoring.py) -> the View ``metric`` needs, events sorted by file index."""
    order = np.argsort(pred["index"], kind="mergesort")
    out, y = pred["out"][order].astype(np.float64), pred["y"][order]
    task, k = pred["task"], int(pred["num_classes"])
    if base_name(metric) in CLASSIFICATION:
        if task == "regression":
            raise ValueError(f"{metric} needs a classification task")
        logits = out[:, :k]
        labels = (y if y.ndim == 1 else y[:, 0]).astype(np.int64)
        return View(prob=softmax(logits), labels=labels)
    if task == "classification":
        raise ValueError(f"{metric} needs a regression task")
    scale = lambda v: v * pred["target_std"] + pred["target_mean"]  # noqa: E731
    col = out[:, k] if task == "joint" else out.reshape(len(out), -1)[:, 0]
    true = y[:, 1] if task == "joint" else y.reshape(-1)
    return View(pred=scale(col), true=scale(true.astype(np.float64)))


def count_blocks(n: int, replicates: int = REPLICATES, seed: int = 0, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Per-event counts of ``replicates`` resamples of ``n`` events, in (b, n) float64 blocks (b * n <= block)."""
    rng = np.random.default_rng(seed)
    rows = max(1, block // max(n, 1))
    for start in range(0, replicates, rows):
        m = min(rows, replicates - start)
        flat = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]
        yield np.bincount(flat.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)


def _binary_auc(v: View, col: int, c: np.ndarray) -> np.ndarray:
    """Weighted AUC of class ``col`` vs the rest: ties count one half (as sklearn's roc_auc_score)."""
    order, starts, pos = v.groups(col)
    w = c[:, order]
    P = np.add.reduceat(w * pos, starts, axis=1)         # (b, groups) positive weight per score value
    N = np.add.reduceat(w * (1 - pos), starts, axis=1)
    below = np.cumsum(N, axis=1) - N                      # negative weight at lower scores
    den = P.sum(1) * N.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (P * (below + 0.5 * N)).sum(1) / den, np.nan)


def _rejection(v: View, eff: float, c: np.ndarray) -> np.ndarray:
    """Weighted 1/FPR at signal efficiency ``eff`` (class 1 = signal), interpolated on the ROC curve as
    metrics.rejection_at does (np.interp over the curve's points), bounded by the background count."""
    order, starts, pos = v.groups(1)
    w = c[:, order]
    P = np.add.reduceat(w * pos, starts, axis=1)[:, ::-1]  # descending thresholds
    N = np.add.reduceat(w * (1 - pos), starts, axis=1)[:, ::-1]
    Pt, Nt = P.sum(1, keepdims=True), N.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([np.zeros_like(Pt), np.cumsum(P, axis=1) / Pt], axis=1)
        fpr = np.concatenate([np.zeros_like(Nt), np.cumsum(N, axis=1) / Nt], axis=1)
    rows = np.arange(len(c))
    k = np.clip((tpr <= eff).sum(1), 1, tpr.shape[1] - 1)  # first point above eff (np.interp's right end)
    t0, t1, f0, f1 = tpr[rows, k - 1], tpr[rows, k], fpr[rows, k - 1], fpr[rows, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(t1 > t0, f0 + (eff - t0) * (f1 - f0) / np.where(t1 > t0, t1 - t0, 1), f1)
        f = np.where(eff >= tpr[:, -1], fpr[:, -1], f)
        out = 1.0 / np.maximum(f, 1.0 / np.maximum(Nt[:, 0], 1.0))
    return np.where((Pt[:, 0] > 0) & (Nt[:, 0] > 0), out, np.nan)


def weighted(metric: str, v: View, c: np.ndarray) -> np.ndarray:
    """``metric`` of ``v`` on each replicate of the counts block ``c`` (b, n) -> (b,). With all counts 1 it is
    the value trainables/metrics.py computes. Raises ValueError for a metric without a bootstrap."""
    name = base_name(metric)
    if name == "auc":
        assert v.prob is not None  # view() gives a classification metric a classification View
        k = v.prob.shape[1]
        if k == 2:
            return _binary_auc(v, 1, c)
        return np.mean([_binary_auc(v, j, c) for j in range(k)], axis=0)  # one-vs-rest macro
    if name == "acc":
        assert v.prob is not None
        correct = (v.prob.argmax(1) == v.labels).astype(np.float64)
        return (c @ correct) / c.sum(1)
    if name.startswith("rej") and name in CLASSIFICATION:
        assert v.prob is not None
        if v.prob.shape[1] != 2:
            raise ValueError(f"{metric} needs two classes")
        return _rejection(v, int(name[3:]) / 100, c)
    if name == "mae":
        assert v.pred is not None and v.true is not None  # view() gives a regression metric a regression View
        return (c @ np.abs(v.pred - v.true)) / c.sum(1)
    if name in ("bias", "abs_bias", "resolution"):
        assert v.pred is not None and v.true is not None
        ok = np.abs(v.true) > 1e-12
        r = np.where(ok, (v.pred - v.true) / np.where(ok, v.true, 1.0), 0.0)
        w = c * ok
        n = w.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (w @ r) / n
            if name == "bias":
                return mean
            if name == "abs_bias":
                return np.abs(mean)
            return np.sqrt(np.maximum((w @ (r * r)) / n - mean * mean, 0.0))
    raise ValueError(f"no bootstrap for '{metric}' (bootstrapped: {', '.join(sorted(SUPPORTED))})")


def resampled(views: list[list[View]], metric: str, replicates: int = REPLICATES, seed: int = 0) -> list[list[np.ndarray]]:
    """``views[g][s]``: model g, seed s, every one on the same test events in the same order.
    -> ``stats[g][s]`` (replicates,): the metric on each replicate, the replicates shared by every model
    (paired). Raises ValueError when the models were scored on different numbers of events."""
    sizes = {len(v) for vs in views for v in vs}
    if len(sizes) != 1:
        raise ValueError(f"the models were scored on different test sets ({sorted(sizes)} events)")
    n = sizes.pop()
    parts: list[list[list[np.ndarray]]] = [[[] for _ in vs] for vs in views]
    for c in count_blocks(n, replicates, seed):
        for g, vs in enumerate(views):
            for s, v in enumerate(vs):
                parts[g][s].append(weighted(metric, v, c))
    return [[np.concatenate(p) for p in ps] for ps in parts]


def seed_mean(stats: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """(replicates,) the mean over the S seeds drawn with replacement, a new draw per replicate (one seed:
    that seed's replicates)."""
    arr = np.stack(stats)                                   # (S, B)
    S, B = arr.shape
    if S == 1:
        return arr[0]
    pick = np.random.default_rng(seed).integers(0, S, size=(B, S))
    with np.errstate(invalid="ignore"):
        return np.nanmean(arr[pick, np.arange(B)[:, None]], axis=1)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding ``level`` of the finite replicates: (lo, hi); NaNs when none is finite."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi)


def prob_better(a: np.ndarray, b: np.ndarray, mode: str) -> float:
    """P(a's metric beats b's) over paired replicates (``mode`` max: higher is better); ties count one half."""
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return float("nan")
    a, b = a[ok], b[ok]
    wins = (a > b) if mode == "max" else (a < b)
    return float(wins.mean() + 0.5 * (a == b).mean())


def win_matrix(samples: list[np.ndarray], mode: str) -> list[list[float | None]]:
    """``m[i][j]`` = P(model i beats model j) on paired replicates; None on the diagonal."""
    return [[None if i == j else prob_better(a, b, mode) for j, b in enumerate(samples)] for i, a in enumerate(samples)]
