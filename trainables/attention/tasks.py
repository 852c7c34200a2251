"""What the event transformer's task heads look at: each task query's cross-attention over the object slots.

For families declaring ``task_attention`` (trainables/registry.py; ``event_transformer``), every fine-tuning
epoch's checkpoint holds ``attention.npz`` (trainables/core/layout.py) computed on the validation events of
rank 0 (at most ``MAX_EVENTS``; model in eval mode). The weights are the head layers' cross-attention softmax, averaged over
attention heads and over the ``head_depth`` layers: per event and query they sum to 1 over the real
objects; padding (an absent jet) gets 0, so an average over events also sums to 1 per query and an often
absent slot gets less on average. The MLflow callback draws it as ``plots/task_attention.png``
(e2e_search/record/figures.py) and ``report`` compares the maps of trials with and without pretraining.

``attention.npz`` (``kind = "task_attention"``)::

    objects          (N,) str     slot names (trainables/data/object_names.py): lepton, met, jet1..jet4
    features         (F,) str     feature names
    queries          (Q,) str     one label per task query (``<task>`` or ``<task> q<i>``)
    tasks            (Q,) str     the task each query belongs to
    groups           (G,) str     "background (class 0)", "signal (class 1)" (binary classification),
                                  "class <c>" (more classes), "all events" (regression)
    group_mean       (G, Q, N)    attention weight, averaged over the group's events (fraction, 0..1)
    group_events     (G,)         events in the group
    group_presence   (G, N)       fraction of the group's events in which the slot holds a real object
    example_attention (K, Q, N)   single events (the classes in turn)
    example_mask     (K, N)       real objects of those events
    example_features (K, N, F)    their features in the file's units (before standardization)
    example_titles   (K,) str     their truth
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from trainables.data.object_names import slot_names

KIND = "task_attention"
EXAMPLES = 4
MAX_EVENTS = 20_000
"""Validation events the maps average over at most (the first of rank 0's share): one more forward pass of
the heads per epoch, bounded on large files."""


class _TaskQueries(Protocol):
    """What a family declaring ``task_attention`` provides (trainables/families/event_transformer.py)."""

    def task_attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def query_labels(self) -> list[str]: ...


def groups_of(task: str, num_classes: int, labels: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """(group names, boolean selections (n,)) of the events: per true class for classification (binary:
    background = class 0, signal = class 1), all events for regression. ``labels``: encoded labels
    ((n,) or (n, 2) for a joint task, class first)."""
    n = len(labels)
    if task == "regression" or num_classes < 2:
        return ["all events"], [np.ones(n, bool)]
    cls = (labels if labels.ndim == 1 else labels[:, 0]).astype(np.int64)
    if num_classes == 2:
        return ["background (class 0)", "signal (class 1)"], [cls == 0, cls == 1]
    return [f"class {c}" for c in range(num_classes)], [cls == c for c in range(num_classes)]


@torch.no_grad()
def task_attention_maps(model: torch.nn.Module, x: np.ndarray, mask: np.ndarray, labels: np.ndarray, *,
                        task: str, num_classes: int, device: Any = "cpu", mean: list[float] | None = None,
                        std: list[float] | None = None, batch: int = 512, examples: int = EXAMPLES) -> dict[str, Any]:
    """The arrays of ``attention.npz`` (see the module) for ``model`` on events ``x`` (n, N, F) standardized
    as the model reads them, ``mask`` (n, N) bool, encoded ``labels``; ``mean``/``std`` (F,) undo the
    standardization for the single events shown. ValueError when there is no event."""
    from trainables.attention.rollout import pick_examples

    if len(x) == 0:
        raise ValueError("no validation event to compute task attention on")
    heads = cast(_TaskQueries, model)
    weights = []
    for i in range(0, len(x), batch):
        xb = torch.as_tensor(x[i:i + batch], dtype=torch.float32, device=device)
        mb = torch.as_tensor(mask[i:i + batch], dtype=torch.bool, device=device)
        weights.append(heads.task_attention(xb, mb).float().cpu().numpy())   # (b, Q, N)
    w = np.concatenate(weights)                                                # (n, Q, N)
    n, N, F = x.shape
    objects, features = slot_names(N, F)
    queries = list(heads.query_labels())
    tasks = [q.split(" q")[0] for q in queries]
    names, sel = groups_of(task, num_classes, labels)
    keep = [i for i, s in enumerate(sel) if s.any()]
    names, sel = [names[i] for i in keep], [sel[i] for i in keep]
    classes = None if task == "regression" or num_classes < 2 else list(
        (labels if labels.ndim == 1 else labels[:, 0]).astype(int)[:256])
    idx = pick_examples(classes, n, examples)
    raw = x[idx].astype(np.float64)
    if mean is not None and std is not None:
        raw = raw * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
    raw = np.where(mask[idx][..., None], raw, 0.0)
    if classes is not None:
        titles = [("signal" if num_classes == 2 and classes[i] == 1 else "background" if num_classes == 2
                   else f"class {classes[i]}") for i in idx]
    else:
        titles = [f"event {i}" for i in idx]
    return {"kind": KIND, "objects": np.asarray(objects), "features": np.asarray(features),
            "queries": np.asarray(queries), "tasks": np.asarray(tasks), "groups": np.asarray(names),
            "group_mean": np.stack([w[s].mean(0) for s in sel]).astype(np.float32),
            "group_events": np.asarray([int(s.sum()) for s in sel]),
            "group_presence": np.stack([mask[s].mean(0) for s in sel]).astype(np.float32),
            "example_attention": w[idx].astype(np.float32), "example_mask": mask[idx].astype(bool),
            "example_features": raw.astype(np.float32), "example_titles": np.asarray(titles)}


def save_task_attention(path: str | Path, model: torch.nn.Module, dataset, data, device: Any = "cpu") -> None:
    """Write ``attention.npz`` for ``model`` on (the first ``MAX_EVENTS`` events of) an ObjectDataset (``x``,
    ``mask``, ``y`` arrays) of the data
    ``data`` (a DataSetup: task, classes, feature mean/std)."""
    n = min(len(dataset.y), MAX_EVENTS)
    z = task_attention_maps(model, np.asarray(dataset.x[:n]), np.asarray(dataset.mask[:n]), np.asarray(dataset.y[:n]),
                            task=data.task, num_classes=int(data.num_classes or 0), device=device,
                            mean=data.mean, std=data.std)
    np.savez_compressed(path, **z)


def is_task_attention(path: str | Path) -> bool:
    """True when ``path`` (an attention.npz) holds task-attention maps rather than an image rollout."""
    with np.load(path) as z:
        return "kind" in z.files and str(z["kind"]) == KIND


def query_means(z) -> dict[str, np.ndarray]:
    """Per task, its queries' maps averaged: task -> (G, N) (trials with different ``task_queries`` compare)."""
    tasks = [str(t) for t in z["tasks"]]
    gm = np.asarray(z["group_mean"])                                           # (G, Q, N)
    return {t: gm[:, [i for i, s in enumerate(tasks) if s == t]].mean(1) for t in dict.fromkeys(tasks)}
