"""Labels and regression targets as the loss sees them: class indices, standardized targets, or both."""

from __future__ import annotations

import numpy as np

from trainables.data.setup import DataSetup
from trainables.errors import UserError


def _dtype_name(y: np.ndarray) -> str:
    """The stored type of a label array, in words a user can match to their file."""
    if y.dtype.kind == "O":
        first = next((v for v in y.ravel()[:1000] if v is not None), None)
        if isinstance(first, (bytes, str)):
            return "variable-length strings"
        if isinstance(first, np.ndarray) or hasattr(first, "__len__"):
            return "variable-length arrays"
        return f"Python objects ({type(first).__name__})"
    if y.dtype.names:
        return f"compound records ({', '.join(y.dtype.names)})"
    if y.dtype.kind in "SU":
        return f"fixed-length strings ({y.dtype.str.lstrip('<>|=')})"
    return str(y.dtype)



def _examples(values: np.ndarray, most: int = 3) -> str:
    out = []
    for v in values.ravel():
        v = v.item() if isinstance(v, np.generic) else v
        if v not in out:
            out.append(v)
        if len(out) == most:
            break
    return ", ".join(repr(v) for v in out)



def class_indices(y: np.ndarray, name: str, which: str, where: str = "") -> np.ndarray:
    """Class labels as stored -> int64 class indices (n,), or a UserError naming ``which``, the dtype and the fix.

    Accepted: integers; booleans (False 0, True 1); floats holding whole numbers (0.0, 1.0); one value per row
    as (n, 1); one-hot rows (n, C) (exactly one 1 per row, the rest 0) -> the index of the 1. Refused: floats
    that are not whole numbers, NaN/Inf, strings and bytes (which class is signal cannot be guessed), other
    objects, soft (not one-hot) rows, higher ranks.
    """
    y = np.asarray(y)
    what = f"'{name}'{where} ({_dtype_name(y)}"
    fix_int = "store the class index of each sample as an integer 0..num_classes-1 (e.g. 0 background, 1 signal)"
    if y.dtype.kind in "OSUV" or y.dtype.names:
        if y.dtype.kind == "O" and _dtype_name(y) == "variable-length arrays":
            raise UserError(f"{what}) holds a variable-length array per sample: classification needs one class index "
                            f"per sample; {fix_int}, or set {which} to such a dataset", key=which)
        raise UserError(f"{what}, e.g. {_examples(y)}) does not hold class indices: {fix_int}, or set {which} to the "
                        "dataset that holds them", key=which)
    if y.dtype.kind not in "biuf":
        raise UserError(f"{what}) does not hold class indices: {fix_int}, or set {which} to the dataset that holds them",
                        key=which)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        C = y.shape[1]
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            bad = int(np.flatnonzero(~np.isfinite(y).all(axis=1))[0])
            raise UserError(f"{what}, one-hot (n, {C})) contains NaN or Inf values (first at row {bad}); clean the file "
                            "or drop those samples", key=which)
        onehot = np.isin(y, (0, 1)).all(axis=1) & (y.sum(axis=1) == 1)
        if not onehot.all():
            bad = int(np.flatnonzero(~onehot)[0])
            raise UserError(f"{what}, shape {y.shape}) is not one-hot: row {bad} is {np.asarray(y[bad]).tolist()[:8]}; "
                            f"store one class index per sample, or one-hot rows (a single 1), in {which}", key=which)
        return np.argmax(y, axis=1).astype(np.int64)
    if y.ndim != 1:
        raise UserError(f"{what}, shape {y.shape}) must hold one class index per sample (or one-hot rows (n, C)); "
                        f"set {which} to the dataset of the labels", key=which)
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            bad = int(np.flatnonzero(~np.isfinite(y))[0])
            raise UserError(f"{what}) contains NaN or Inf values (first at row {bad}): every sample needs a class; "
                            "drop those samples or give them a class index in the file", key=which)
        frac = np.flatnonzero(y != np.round(y))
        if len(frac):
            raise UserError(f"{what}) holds non-integer values (e.g. {y[frac[0]]:g} at row {int(frac[0])}): "
                            f"classification needs class indices; {fix_int}, set {which} to the label dataset, or "
                            "set task.type: regression to fit it as a number", key=which)
    return y.astype(np.int64)



def target_values(t: np.ndarray, name: str, which: str, where: str = "") -> np.ndarray:
    """A regression target as stored -> float64 (n,): numbers, one per sample ((n, 1) squeezed), all finite."""
    t = np.asarray(t)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dtype.kind not in "iuf" or t.dtype.names:
        raise UserError(f"'{name}'{where} ({_dtype_name(t)}) is not a number per sample: a regression target needs "
                        f"numbers; set {which} to a numeric dataset", key=which)
    if t.ndim != 1:
        raise UserError(f"'{name}'{where} ({t.dtype}, shape {t.shape}) must be one value per sample; set {which} to a "
                        "dataset of one number per sample", key=which)
    if t.dtype.kind == "f" and not np.isfinite(t).all():
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        raise UserError(f"'{name}'{where} contains NaN or Inf values (first at row {bad}); clean the file or drop "
                        "those samples", key=which)
    return t.astype(np.float64)



def encode_labels(s: DataSetup, labels: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """What the loss sees: class indices (int64), the standardized target (float32), or for a joint
    task (n, 2) float32 of [class index, standardized target]. ``labels``/``targets`` as stored in the file
    (any layout :func:`check_labels` accepts: bool, whole floats, (n, 1), one-hot)."""
    if s.task == "classification":
        return class_indices(labels, s.label_key, "data.label_key")
    if s.task == "regression":
        t = target_values(labels, s.label_key, "task.target")
        return ((t - s.target_mean) / s.target_std).astype(np.float32)
    assert targets is not None and s.target_key is not None  # a joint task always reads its target_key
    t = (target_values(targets, s.target_key, "task.target") - s.target_mean) / s.target_std
    return np.stack([class_indices(labels, s.label_key, "data.label_key").astype(np.float32), t.astype(np.float32)],
                    axis=-1)



def target_stats(y: np.ndarray, train: list[int]) -> tuple[float, float]:
    """Mean and std of a regression target on the training split (targets are standardized with them)."""
    t = y[train].astype(np.float64)
    return float(t.mean()), float(t.std() or 1.0)
