"""The train/val/test split of a data file: deterministic, stratified by class, checked against the labels."""

from __future__ import annotations

import numpy as np

from e2e_search.data.labels import label_source, target_source
from e2e_search.spec.schema import SearchSpace
from trainables.errors import UserError


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, limit: int | None = None,
                  labels: np.ndarray | None = None):
    """Deterministic train/val/test split of ``range(n)`` (sorted index lists), the same for the same ``seed``.

    ``limit``: only that many samples, a random subset drawn with ``seed``. ``labels`` (class indices, one per
    sample): a stratified split, each class divided in the same fractions, so a rare class lands in every split
    whenever it can: a class of at least 3 samples (2 when ``test_fraction`` is 0) has one or more in each.
    """
    perm = np.random.default_rng(seed).permutation(n)
    if limit is not None:
        perm = perm[:limit]
    if labels is not None:
        return _stratified(perm, np.asarray(labels)[perm], val_fraction, test_fraction)
    m = len(perm)
    n_test = int(round(m * test_fraction))
    n_val = max(1, int(round(m * val_fraction)))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


def _stratified(perm: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float):
    train, val, test = [], [], []
    for c in np.unique(labels):
        members = perm[labels == c]  # in the seeded random order
        m = len(members)
        k_test = int(round(m * test_fraction))
        k_val = int(round(m * val_fraction))
        if m >= 2 + (test_fraction > 0):  # room for one in each split: take it
            k_val = max(1, k_val)
            k_test = max(1, k_test) if test_fraction > 0 else 0
            while k_val + k_test >= m:  # training keeps one at least
                if k_val >= k_test:
                    k_val -= 1
                else:
                    k_test -= 1
        else:  # too few for every split: training first, then validation (check_split says what is missing)
            k_val, k_test = (1 if m == 2 else 0), 0
        test += members[:k_test].tolist()
        val += members[k_test : k_test + k_val].tolist()
        train += members[k_test + k_val :].tolist()
    return sorted(train), sorted(val), sorted(test)


def _counts(y: np.ndarray, parts: list, C: int) -> str:
    return ", ".join(f"{name} {np.bincount(y[idx], minlength=C).tolist()}" for name, idx in parts)


def split_checked(cfg: SearchSpace, n: int, y: np.ndarray, t: np.ndarray | None = None):
    """The train/val/test split of ``n`` samples (stratified by class for classification), checked against the
    labels before Ray starts: every class in every split (else val_auc is NaN in every epoch), and a regression
    target that varies within every split. ``y``: converted labels (see :func:`check_labels`)."""
    d = cfg.data
    classes = y if cfg.task.classifies else None
    train, val, test = split_indices(n, d.val_fraction, d.test_fraction, d.seed, d.limit, labels=classes)
    parts = [("train", train), ("val", val)] + ([("test", test)] if d.test_fraction > 0 else [])
    by = (f"data.val_fraction={d.val_fraction:g}, data.test_fraction={d.test_fraction:g}, data.seed={d.seed}"
          + (f", data.limit={d.limit}" if d.limit else ""))
    if cfg.task.classifies:
        C = cfg.task.num_classes
        assert C is not None  # TaskConfig sets num_classes for a task that classifies
        used = np.concatenate([np.asarray(idx, np.int64) for _, idx in parts])
        in_use = np.bincount(y[used], minlength=C)
        label_key, which = label_source(cfg)
        for c in range(C):
            if in_use[c] == 0:
                if d.limit and np.any(y == c):
                    raise UserError(f"class {c} has no sample among the {len(used)} drawn by data.limit={d.limit} "
                                    f"(the file has {int(np.sum(y == c))}); raise or remove data.limit", key="data.limit")
                raise UserError(f"class {c} has no sample in '{label_key}' (class counts "
                                f"{np.bincount(y, minlength=C).tolist()}) but task.num_classes is {C}: every class "
                                f"needs samples; set task.num_classes to the number of classes, or relabel them "
                                f"0..K-1 in {which}", key="task.num_classes")
            for name, idx in parts:
                if not np.any(y[idx] == c):
                    key = {"train": "data.val_fraction", "val": "data.val_fraction", "test": "data.test_fraction"}[name]
                    need = len(parts)
                    fix = (f"add samples of class {c}" + (", or set data.test_fraction: 0 (then 2 suffice)"
                                                          if d.test_fraction > 0 else ""))
                    raise UserError(f"the {name} split has no sample of class {c} (per-split class counts "
                                    f"{_counts(y, parts, C)}; split by {by}): val_auc and the other metrics need "
                                    f"every class in every split, and the split (stratified by class) needs {need} "
                                    f"samples of a class for that but class {c} has {int(in_use[c])}; {fix}", key=key)
    if cfg.task.regresses:
        tv, (tkey, twhich) = (y, label_source(cfg)) if t is None else (t, target_source(cfg))
        distinct = {name: len(np.unique(tv[idx])) for name, idx in parts}
        if len(np.unique(tv[np.concatenate([np.asarray(i, np.int64) for _, i in parts])])) < 2:
            raise UserError(f"'{tkey}' takes a single value ({tv[0]:g}) in every sample: nothing to regress; set "
                            f"{twhich} to a quantity that varies", key=twhich)
        for name, idx in parts:
            if distinct[name] < 2:
                key = "data.test_fraction" if name == "test" else "data.val_fraction"
                raise UserError(f"the {name} split holds {len(idx)} sample(s) with {distinct[name]} distinct value of "
                                f"'{tkey}' (distinct values: {', '.join(f'{k} {v}' for k, v in distinct.items())}; "
                                f"split by {by}): a regression needs at least 2 in each; raise {key} or give more "
                                "samples", key=key)
    return train, val, test


def label_order_checked(cfg: SearchSpace, train: list[int], y: np.ndarray) -> list[int]:
    """The training split's label order (trainables/data/labelled.py), checked before Ray against every
    ``label_fraction`` the search can give a trial: each class keeps at least one labelled training event.
    ``y``: converted labels of every sample. Raises UserError naming params.label_fraction."""
    from e2e_search.spec.shapes import candidates
    from trainables.data.labelled import label_order, labelled_count

    classes = np.asarray(y)[np.asarray(train, np.int64)] if cfg.task.classifies and len(train) else None
    order = label_order(train, classes, cfg.data.seed)
    dim = cfg.params.get("label_fraction")
    if dim is None or classes is None:
        return order
    fractions = [float(v) for v in candidates(dim, as_int=False) if isinstance(v, int | float)]
    if not fractions:
        return order
    C = cfg.task.num_classes or 0
    label_of = dict(zip(np.asarray(train, np.int64).tolist(), classes.tolist()))
    f = min(fractions)  # the smallest keeps the fewest labels (its labelled events are among the others')
    k = labelled_count(len(order), f)
    counts = np.bincount([label_of[i] for i in order[:k]], minlength=C)
    if (counts == 0).any():
        c = int(np.argmin(counts))
        first = next(i for i, e in enumerate(order) if label_of[e] == c)  # where class c's first label sits
        raise UserError(f"label_fraction {f:g} keeps {k} of the {len(order)} training events' labels (per class "
                        f"{counts.tolist()}): class {c} has no labelled training event; raise params.label_fraction "
                        f"to at least {(first + 1) / len(order):.2g}", key="params.label_fraction")
    return order
