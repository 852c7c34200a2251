"""Per-epoch physics metrics of a trial (numpy in, floats out).

Classification: ``val_auc`` (one-vs-rest macro for K > 2), ``val_acc`` and, for
two classes (class 1 = signal), background rejection 1/FPR at 30/50/70% signal
efficiency (``val_rej30`` ...). Regression, on the relative residual
r = (pred - true) / true: ``val_mae`` (target units), ``val_bias`` = mean r,
``val_resolution`` = std r, overall and per bin of the true value
(``val_bin/<lo>-<hi>/mae`` ..., names MLflow accepts for any range: ``val_bin/1000-4.692e4/mae``).
"""

from __future__ import annotations

import numpy as np

from trainables.names import bin_key, edge_labels

# sklearn is imported where used: every Ray process that unpickles the worker loop imports this module.

EFFICIENCIES = (0.3, 0.5, 0.7)
MASS_BINS = 4
"""Equal-width bins of the true target over the validation range (the same every epoch)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z)
    return prob / prob.sum(axis=1, keepdims=True)


def rejection_at(labels: np.ndarray, score: np.ndarray, efficiencies=EFFICIENCIES) -> dict[str, float]:
    """1/FPR at each signal efficiency (TPR). With no background passing, the bound 1/(1/n_bkg) = n_bkg."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, score)
    n_bkg = max(1, int((labels == 0).sum()))
    out = {}
    for eff in efficiencies:
        f = float(np.interp(eff, tpr, fpr))
        out[f"val_rej{round(eff * 100)}"] = 1.0 / max(f, 1.0 / n_bkg)
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``logits`` (N, K), ``labels`` (N,) -> val_auc, val_acc, val_rej30/50/70 (K = 2)."""
    from sklearn.metrics import roc_auc_score

    prob = softmax(logits)
    out = {"val_acc": float((prob.argmax(axis=1) == labels).mean())}
    present = np.unique(labels)
    if len(present) < 2:
        out["val_auc"] = float("nan")
    elif prob.shape[1] == 2:
        out["val_auc"] = float(roc_auc_score(labels, prob[:, 1]))
        out.update(rejection_at(labels, prob[:, 1]))
    else:
        out["val_auc"] = float(roc_auc_score(labels, prob, multi_class="ovr", labels=list(range(prob.shape[1]))))
    return out


def _residual_metrics(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}mae": float(np.abs(pred - true).mean()) if pred.size else float("nan")}
    ok = np.abs(true) > 1e-12
    r = (pred[ok] - true[ok]) / true[ok]
    out[f"{prefix}bias"] = float(r.mean()) if r.size else float("nan")
    out[f"{prefix}resolution"] = float(r.std()) if r.size else float("nan")
    return out


def regression_metrics(pred: np.ndarray, true: np.ndarray, bins: int = MASS_BINS) -> dict[str, float]:
    """val_mae, val_bias, val_resolution, val_abs_bias; the same per bin of the true value."""
    pred = pred.astype(np.float64)
    true = true.astype(np.float64)
    out = _residual_metrics(pred, true, "val_")
    out["val_abs_bias"] = abs(out["val_bias"])
    if bins > 1 and true.size and true.max() > true.min():
        edges = np.linspace(true.min(), true.max(), bins + 1)
        which = np.clip(np.searchsorted(edges, true, side="right") - 1, 0, bins - 1)
        labels = edge_labels(edges)  # valid MLflow names for any range and sign: 4.692e4, -1e-5, ...
        for b in range(bins):
            sel = which == b
            if sel.any():
                binned = _residual_metrics(pred[sel], true[sel], "")
                out.update({bin_key("val_bin/", labels[b], labels[b + 1], k): v for k, v in binned.items()})
    return out


def task_metrics(task: str, num_classes: int, out: np.ndarray, y: np.ndarray,
                 target_mean: float = 0.0, target_std: float = 1.0) -> dict[str, float]:
    """Model outputs ``out`` (N, outputs) and encoded labels ``y`` (see data.encode_labels) -> metrics."""
    metrics: dict[str, float] = {}
    scale = lambda v: v * target_std + target_mean  # noqa: E731
    if task == "classification":
        metrics.update(classification_metrics(out, y.astype(np.int64)))
    elif task == "regression":
        metrics.update(regression_metrics(scale(out.reshape(len(out), -1)[:, 0]), scale(y.reshape(-1))))
    else:  # joint: [K logits, 1 regression output]; y (N, 2) = [class, standardized target]
        metrics.update(classification_metrics(out[:, :num_classes], y[:, 0].astype(np.int64)))
        metrics.update(regression_metrics(scale(out[:, num_classes]), scale(y[:, 1])))
    return metrics
