"""Plots of a trial at its best epoch, written as PNG files (logged to the trial's MLflow run).

* ``learning_curves.png``: losses and the search metric per epoch (pretraining epochs included);
* classification: ``roc.png`` (background rejection vs signal efficiency, class 1 = signal) and
  ``scores.png`` (signal-probability distributions per true class);
* regression: ``mass_pred_vs_true.png`` (2-D histogram), ``mass_response.png`` (mean response
  pred/true and resolution (std of (pred - true)/true) per bin of the true value);
* transformer families: ``attention_rollout.png``, a few validation images (summed over
  channels) and the attention rollout over them (``e2e_search/rollout.py``).

Inputs are the ``predictions.npz`` (validation outputs and encoded labels, see
``data.encode_labels``) and ``attention.npz`` files the worker loop saves beside each checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .core.layout import ATTENTION_FILE, PREDICTIONS_FILE  # noqa: F401 - the files this module reads
from .metrics import softmax


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_predictions(path: Path, out: np.ndarray, y: np.ndarray, *, task: str, num_classes: int,
                     target_mean: float, target_std: float) -> None:
    np.savez_compressed(path, out=out.astype(np.float32), y=y, task=task, num_classes=num_classes,
                        target_mean=target_mean, target_std=target_std)


def learning_curves(history: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss"):
        if history.get(key):
            e, v = zip(*history[key])
            a1.plot(e, v, marker="o", label=key)
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend()
    if history.get(metric):
        e, v = zip(*history[metric])
        a2.plot(e, v, marker="o", color="C3")
    a2.set_xlabel("epoch"), a2.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _classification(out: np.ndarray, labels: np.ndarray, folder: Path) -> list[Path]:
    from sklearn.metrics import roc_curve

    plt = _plt()
    prob = softmax(out)
    score = prob[:, 1] if prob.shape[1] == 2 else prob.max(axis=1)
    files = []
    if prob.shape[1] == 2 and len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, score)
        ok = fpr > 0
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(tpr[ok], 1 / fpr[ok])
        ax.set_yscale("log"), ax.set_xlabel("signal efficiency"), ax.set_ylabel("background rejection 1/FPR")
        fig.tight_layout(), fig.savefig(folder / "roc.png", dpi=90), plt.close(fig)
        files.append(folder / "roc.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for c in np.unique(labels):
        ax.hist(score[labels == c], bins=40, range=(0, 1), histtype="step", density=True, label=f"class {c}")
    ax.set_xlabel("class-1 probability" if prob.shape[1] == 2 else "max class probability"), ax.legend()
    fig.tight_layout(), fig.savefig(folder / "scores.png", dpi=90), plt.close(fig)
    return files + [folder / "scores.png"]


def _regression(pred: np.ndarray, true: np.ndarray, folder: Path, bins: int = 10) -> list[Path]:
    plt = _plt()
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.hist2d(true, pred, bins=40, range=[[lo, hi], [lo, hi]], cmap="viridis")
    ax.plot([lo, hi], [lo, hi], "w--", lw=1)
    ax.set_xlabel("true"), ax.set_ylabel("predicted")
    fig.tight_layout(), fig.savefig(folder / "mass_pred_vs_true.png", dpi=90), plt.close(fig)

    edges = np.linspace(true.min(), true.max(), bins + 1)
    centres, response, resolution = [], [], []
    ok = np.abs(true) > 1e-12
    for a, b in zip(edges[:-1], edges[1:]):
        sel = ok & (true >= a) & ((true < b) | (b == edges[-1]))
        if sel.sum() >= 2:
            r = pred[sel] / true[sel]
            centres.append((a + b) / 2), response.append(r.mean()), resolution.append(((pred[sel] - true[sel]) / true[sel]).std())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(centres, response, marker="o"), a1.axhline(1.0, color="gray", lw=1)
    a1.set_xlabel("true"), a1.set_ylabel("mean response pred/true")
    a2.plot(centres, resolution, marker="o", color="C1")
    a2.set_xlabel("true"), a2.set_ylabel("resolution std((pred-true)/true)")
    fig.tight_layout(), fig.savefig(folder / "mass_response.png", dpi=90), plt.close(fig)
    return [folder / "mass_pred_vs_true.png", folder / "mass_response.png"]


def prediction_plots(pred_file: Path, folder: Path) -> list[Path]:
    z = np.load(pred_file)
    task, k = str(z["task"]), int(z["num_classes"])
    out, y = z["out"], z["y"]
    scale = lambda v: v * float(z["target_std"]) + float(z["target_mean"])  # noqa: E731
    if task == "classification":
        return _classification(out, y.astype(np.int64), folder)
    if task == "regression":
        return _regression(scale(out.reshape(len(out), -1)[:, 0]), scale(y.reshape(-1)), folder)
    return _classification(out[:, :k], y[:, 0].astype(np.int64), folder) + _regression(
        scale(out[:, k]), scale(y[:, 1]), folder)


def attention_plot(attn_file: Path, path: Path) -> Path:
    """Top row: each image (channels summed, log scale); bottom row: its attention rollout over the image."""
    z = np.load(attn_file)
    images, maps, titles = z["images"], z["maps"], [str(t) for t in z["titles"]]
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), squeeze=False)
    for i in range(n):
        img = np.log1p(np.abs(images[i]).sum(0))                            # (H, W)
        axes[0, i].imshow(img, cmap="viridis", origin="lower")
        axes[0, i].set_title(titles[i], fontsize=9)
        axes[1, i].imshow(img, cmap="gray_r", origin="lower")
        m = maps[i] - maps[i].min()  # the residual path keeps every token's share high: stretch the range
        axes[1, i].imshow(m / max(float(m.max()), 1e-12), cmap="inferno", alpha=0.6, origin="lower", vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("image (log, channels summed)", fontsize=8)
    axes[1, 0].set_ylabel("attention rollout (min to max)", fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=90), plt.close(fig)
    return path
