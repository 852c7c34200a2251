"""Per-epoch physics metrics of a trial (numpy in, floats out)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``logits`` (N, K), ``labels`` (N,) -> val_auc (one-vs-rest macro for K > 2), val_acc."""
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    out = {"val_acc": float((prob.argmax(axis=1) == labels).mean())}
    present = np.unique(labels)
    if len(present) < 2:
        out["val_auc"] = float("nan")
    elif prob.shape[1] == 2:
        out["val_auc"] = float(roc_auc_score(labels, prob[:, 1]))
    else:
        out["val_auc"] = float(roc_auc_score(labels, prob, multi_class="ovr", labels=list(range(prob.shape[1]))))
    return out


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """val_mae (target units); relative residual r = (pred - true) / true: val_bias = mean r,
    val_resolution = std r."""
    pred = pred.astype(np.float64)
    true = true.astype(np.float64)
    out = {"val_mae": float(np.abs(pred - true).mean())}
    ok = np.abs(true) > 1e-12
    r = (pred[ok] - true[ok]) / true[ok]
    out["val_bias"] = float(r.mean()) if r.size else float("nan")
    out["val_resolution"] = float(r.std()) if r.size else float("nan")
    return out
