"""Plots of a trial at its best epoch, written as PNG files (logged to the trial's MLflow run).

* ``learning_curves.png``: losses and the search metric per epoch (pretraining epochs included);
* classification: ``roc.png`` (background rejection vs signal efficiency, class 1 = signal) and
  ``scores.png`` (signal-probability distributions per true class);
* regression: ``mass_pred_vs_true.png`` (2-D histogram), ``mass_response.png`` (mean response
  pred/true and resolution (std of (pred - true)/true) per bin of the true value);
* transformer families: ``attention_rollout.png``, a few validation images (summed over
  channels) and the attention rollout over them (``trainables/attention/rollout.py``);
* ``event_transformer``: ``task_attention.png``, each task query's cross-attention over the object
  slots, per class and for single events (``trainables/attention/tasks.py``).

Inputs are the ``predictions.npz`` (validation outputs and encoded labels, see
``data.encode_labels``) and ``attention.npz`` files the worker loop saves beside each checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainables.metrics import softmax


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt




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
            centres.append((a + b) / 2)
            response.append(r.mean())
            resolution.append(((pred[sel] - true[sel]) / true[sel]).std())
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


def _attention_grid(ax, w: np.ndarray, rows: list[str], cols: list[str], title: str, vmax: float,
                    absent: np.ndarray | None = None) -> None:
    """One heatmap: ``w`` (rows, cols) attention weights with their values written in; absent columns hatched."""
    ax.imshow(w, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            if absent is not None and absent[j]:
                ax.text(j, i, "–", ha="center", va="center", color="w", fontsize=7)
            else:
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if w[i, j] > 0.6 * vmax else "w")
    ax.set_xticks(range(len(cols)), cols, rotation=45, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=8)


def task_attention_plot(attn_file: Path, path: Path) -> Path:
    """``task_attention.png``: top row, each task query's attention over the object slots averaged over the
    validation events of each class (signal, background); bottom row, a few single events (absent objects
    marked –, the leading object's pT in the title). Input: an ``attention.npz`` of kind task_attention
    (trainables/attention/tasks.py)."""
    z = np.load(attn_file)
    objects, queries = [str(o) for o in z["objects"]], [str(q) for q in z["queries"]]
    groups, gm = [str(g) for g in z["groups"]], z["group_mean"]                # (G, Q, N)
    ex, em, titles = z["example_attention"], z["example_mask"], [str(t) for t in z["example_titles"]]
    feats = z["example_features"]
    plt = _plt()
    cols = max(len(groups), len(ex), 1)
    fig, axes = plt.subplots(2, cols, figsize=(2.9 * cols, 1.2 + 0.45 * len(queries) + 4.0), squeeze=False)
    vmax = max(float(gm.max()) if gm.size else 0.0, float(ex.max()) if ex.size else 0.0, 1e-6)
    for g, name in enumerate(groups):
        _attention_grid(axes[0, g], gm[g], queries, objects, f"{name}: mean of {int(z['group_events'][g])} events",
                        vmax)
    for k in range(len(ex)):
        pts = "/".join(f"{feats[k, j, 0]:.0f}" if em[k, j] else "–" for j in range(min(3, len(objects))))
        _attention_grid(axes[1, k], ex[k], queries, objects,
                        f"one {titles[k]} event\n{'/'.join(objects[:3])} pT {pts}", vmax, ~em[k])
    for row in axes:
        for ax in row:
            if not ax.images:
                ax.axis("off")
    fig.suptitle("task queries' cross-attention over the objects (validation, best epoch)", fontsize=9)
    fig.tight_layout(), fig.savefig(path, dpi=90), plt.close(fig)
    return path
