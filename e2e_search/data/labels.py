"""Labels and regression targets of a data file: which keys hold them, their checks and conversion, their encoding.

Class labels become int64 class indices (n,); regression targets float64 (n,). Every refusal is a
:class:`~trainables.errors.UserError` naming the config key, the stored type and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2e_search.spec.schema import SearchSpace
from trainables.data.targets import class_indices, target_values
from trainables.errors import UserError


def label_source(cfg: SearchSpace) -> tuple[str, str]:
    """(HDF5 key of the label (classification, joint) or target (regression), the config key that names it)."""
    d = cfg.data
    if cfg.task.classifies:
        return d.label_key, "data.label_key"
    return target_source(cfg)


def target_source(cfg: SearchSpace) -> tuple[str, str]:
    """(HDF5 key of the regression target, the config key that names it)."""
    key = cfg.target_key
    assert key is not None  # called for regression tasks only, whose task.target TaskConfig always sets
    return key, "data.target_key" if cfg.data.target_key else "task.target"










def check_labels(cfg: SearchSpace, y: np.ndarray, label_key: str, which: str, path: str | Path | None = None,
                 *, target: bool | None = None) -> np.ndarray:
    """Labels (classification) or targets (regression, or ``target=True``), checked and converted: class indices
    (int64, each in 0..num_classes-1; see :func:`class_indices`) or float64 targets (see :func:`target_values`)."""
    where = f" in {path}" if path else ""
    if target is None:
        target = not cfg.task.classifies
    if target:
        return target_values(y, label_key, which, where)
    C = cfg.task.num_classes
    assert C is not None  # TaskConfig sets num_classes for a task that classifies
    yi = class_indices(y, label_key, which, where)
    if np.asarray(y).ndim == 2 and np.asarray(y).shape[1] > 1 and np.asarray(y).shape[1] != C:
        raise UserError(f"'{label_key}'{where} is one-hot with {np.asarray(y).shape[1]} classes but task.num_classes is "
                        f"{C}; set task.num_classes: {np.asarray(y).shape[1]}", key="task.num_classes")
    if len(yi) and yi.min() < 0:
        raise UserError(f"'{label_key}'{where} ({np.asarray(y).dtype}) holds negative labels (range {yi.min()}..{yi.max()}): "
                        f"class indices run 0..{C - 1}; relabel them (e.g. -1 -> 0) or set {which} to the class "
                        "index dataset", key=which)
    if len(yi) and yi.max() >= C and yi.min() >= 1 and len(np.unique(yi)) == yi.max():  # labels 1..K, no 0
        raise UserError(f"'{label_key}'{where} holds labels {yi.min()}..{yi.max()} but class indices start at 0; "
                        f"relabel them 0..{yi.max() - 1} (e.g. y - 1) in {which}", key=which)
    if len(yi) and yi.max() >= C:
        raise UserError(f"'{label_key}'{where} holds labels {yi.min()}..{yi.max()} but task.num_classes is {C}; set "
                        f"task.num_classes: {yi.max() + 1} (or {which} to the class index dataset)", key="task.num_classes")
    return yi


def read_labels(cfg: SearchSpace, need) -> tuple[np.ndarray, np.ndarray | None, str, str | None]:
    """Checked and converted (class indices or targets, joint targets or None, label key, joint target key or None).

    ``need(key, which)`` returns the file's dataset ``key`` (or raises naming ``which``).
    """
    label_key, which = label_source(cfg)
    y = check_labels(cfg, need(label_key, which)[...], label_key, which)
    if cfg.task.type != "joint":
        return y, None, label_key, None
    tkey, twhich = target_source(cfg)
    t = check_labels(cfg, need(tkey, twhich)[...], tkey, twhich, target=True)
    if len(t) != len(y):
        raise UserError(f"'{tkey}' has {len(t)} values but '{label_key}' has {len(y)}; they must match: set {twhich} "
                        "to the target of the same samples", key=twhich)
    return y, t, label_key, tkey




