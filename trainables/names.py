"""Names the product builds from data, made valid for MLflow (every platform and backend) and the file system.

MLflow accepts metric, param and tag keys of at most 250 characters matching ``^[/\\w.\\- ]*$`` (``:`` too,
except on Windows) that do not resolve to another path (no empty, ``.`` or ``..`` component); params hold
at most 6000 characters, tags 8000. Registered model names may not contain ``/`` or ``:``; SQL backends
keep experiment and model names in 256 characters, run names in 250.

No heavy imports here: Ray's worker processes import this module (through ``metrics``).
"""

from __future__ import annotations

import hashlib
import re

KEY_MAX = 250
PARAM_VALUE_MAX = 6000
TAG_VALUE_MAX = 8000
EXPERIMENT_NAME_MAX = 256
MODEL_NAME_MAX = 256
RUN_NAME_MAX = 250
FILE_NAME_MAX = 255  # bytes of one path component on common file systems

_NOT_KEY = re.compile(r"[^A-Za-z0-9_./\- ]")
_EXPONENT = re.compile(r"e([+-]?)0*(\d)")


def mlflow_key(name: object) -> str:
    """``name`` as a metric/param/tag key MLflow accepts everywhere; valid keys come back unchanged.

    Other characters become ``_``; empty, ``.`` and ``..``-led path components are dropped or prefixed;
    a key longer than 250 characters is cut and ends in a hash of the whole name (so two long names
    stay distinct)."""
    text = str(name)
    s = _NOT_KEY.sub("_", text)
    parts = [p if not (p == "." or p.startswith("..")) else "_" + p for p in s.split("/") if p]
    s = "/".join(parts) or "_"
    if len(s) > KEY_MAX:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        s = s[: KEY_MAX - 9].rstrip("/") + "_" + digest
    return s


def unique_keys(items: dict[str, object]) -> dict[str, object]:
    """``{mlflow_key(k): v}``; two keys that clean to the same name get ``_2``, ``_3`` ... (MLflow refuses
    duplicate params in one batch)."""
    out: dict[str, object] = {}
    for k, v in items.items():
        key = base = mlflow_key(k)
        n = 1
        while key in out:
            n += 1
            key = mlflow_key(f"{base[: KEY_MAX - 8]}_{n}")
        out[key] = v
    return out


def param_value(value: object) -> str:
    return str(value)[:PARAM_VALUE_MAX]


def tag_value(value: object) -> str:
    return str(value)[:TAG_VALUE_MAX]


def number(x: float, digits: int = 4) -> str:
    """``x`` in ``digits`` significant digits, the exponent without ``+`` or leading zeros:
    46920.1 -> '4.692e4', 1.2e-05 -> '1.2e-5', -0.5 -> '-0.5'. Always a valid key fragment."""
    return _EXPONENT.sub(lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{float(x):.{digits}g}")


def edge_labels(edges, digits: int = 4) -> list[str]:
    """The edges of bins as short numbers, with more digits where 4 would make two distinct edges equal
    (bins 1000.0001-1000.0002 must not share a metric name)."""
    values = [float(e) for e in edges]
    distinct = len(set(values))
    for d in range(digits, 18):
        labels = [number(v, d) for v in values]
        if len(set(labels)) == distinct:
            return labels
    return [repr(v) for v in values]  # not reached: 17 digits tell every float64 apart


def bin_key(prefix: str, lo: str, hi: str, name: str) -> str:
    """``<prefix><lo>-<hi>/<name>``, e.g. ``val_bin/1000-4.692e4/mae``, ``val_bin/-100--50/bias``."""
    return mlflow_key(f"{prefix}{lo}-{hi}/{name}")


def file_name(name: str) -> str:
    """``name`` as one path component: no separators or shell-hostile characters, at most 255 bytes."""
    s = re.sub(r"[^A-Za-z0-9_.+\-]", "_", name).lstrip(".") or "_"
    return s[:FILE_NAME_MAX]
