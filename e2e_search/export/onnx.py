"""Export a trained trial to ONNX: ``e2e-search export SOURCE --format onnx --out FILE``.

SOURCE is a trial checkpoint (``PATH/checkpoint.pt``, or the folder holding it), an MLflow
run id (its ``best_checkpoint/checkpoint.pt`` artifact) or a registered model
(``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, e.g. ``models:/jets-classifier@champion``).

The model is rebuilt exactly as the worker loop built it (``trainables.core.model.build_model``
from the checkpoint's family, params and data settings), loaded with the checkpoint's
weights and put in eval mode; its normal forward (never the pretraining one) is exported
with a dynamic batch axis:

* image families: input ``image`` float32 (batch, C, H, W), C and (H, W) the checkpoint's
  ``in_chans`` and ``img_size`` (after the data's resize); the model pads to its patch
  grid itself. Images are preprocessed as in training (``trainables.data.transforms.preprocess``:
  channel selection in the order of ``data.channels``, zero_suppress, clip, log1p, resize,
  per-channel (x - mean) / std), all recorded in the file's metadata;
* object families: inputs ``objects`` float32 (batch, N, F), standardized per feature
  with the data's mean/std, padding rows zero, and ``mask`` **bool** (batch, N), True =
  real object;
* hit-list families (``hit_transformer``): inputs ``hits`` float32 (batch, K, 4) = (channel, row,
  column, energy) of the K most energetic non-empty pixels (K fixed, in the metadata), zero-padded,
  and ``mask`` bool (batch, K), True = real hit (``trainables.families.hit_transformer.hit_list``
  builds them from a preprocessed image); the model merges and caps them itself;
* output ``output`` float32 (batch, outputs): classification logits (softmax gives the
  probabilities), a regression target standardized (physical = out * target_std +
  target_mean), or, for a joint task, the logits then the regression column.

Exporter: the TorchScript exporter first (it handles every family, swin included),
the dynamo exporter (``torch.export`` + onnxscript) when the first one fails; ``--exporter``
picks one. ``--opset N`` is written exactly or refused: the file's default-domain opset is
checked after export (the dynamo exporter builds opset 18 and down-converts, falling back to
18 silently when it cannot), and a refusal names the operator that needs a newer opset and
the lowest opset that works (found by exporting again at the opsets the failures point to).
The file is accepted only when onnxruntime (CPUExecutionProvider) reproduces
PyTorch within ``PARITY_TOL`` on ``PARITY_EVENTS`` realistic random events (and on batch 1);
otherwise nothing is written. The file is written to a temporary name in the output's
folder and renamed at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e2e_search.record.checkpoints import (
    ANSI,
    INPUT_FORMS,
    Trained,
    as_raw,
    fetch_checkpoint,
    first_line,
    input_names,
    load_trained,
    log_beside,
    random_inputs,
    real_inputs,
    torch_forward,
)
from trainables.errors import UserError, did_you_mean

FORMATS = ("onnx",)
EXPORTERS = ("auto", "torchscript", "dynamo")
PARITY_TOL = 1e-4
"""Largest accepted |onnxruntime - PyTorch| over every output value."""
PARITY_EVENTS = 64
EXAMPLE_BATCH = 2
"""Batch of the example inputs given to the exporter (not 1: a batch of 1 may be specialized)."""
BENCH_BUDGET_S = 3.0
"""Timing of one runtime at one batch size stops after this many seconds (at least 3 runs)."""


OPSET_MIN = 7
"""Lowest ONNX opset accepted for ``--opset`` (the TorchScript exporter's own minimum)."""
OPSET_PROBES = 5
"""At most this many extra exports per exporter when looking for the lowest opset that works."""


class ParityError(ValueError):
    """onnxruntime does not reproduce PyTorch within PARITY_TOL."""


class OpsetError(ValueError):
    """The requested opset cannot be written: ``operator`` needs opset ``since`` or newer (None: not said)."""

    def __init__(self, message: str, operator: str | None = None, since: int | None = None, *, too_new: bool = False):
        super().__init__(message)
        self.operator = operator
        self.since = since
        self.too_new = too_new  # the exporter does not know an opset that new: a newer one cannot help


def opset_max() -> int:
    """The newest opset the installed onnx knows (both exporters and onnxruntime are checked after export)."""
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def _first_opset(op: str) -> int | None:
    """The opset in which ONNX operator ``op`` (default domain) first exists."""
    import onnx.defs

    versions = [s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and s.domain == ""]
    return min(versions) if versions else None


# What the exporters and onnx's version converter say when an operator needs a newer opset,
# -> (operator, first opset that has it or None).
_OPSET_MESSAGES: list[tuple[re.Pattern, Callable[[re.Match], tuple[str, int | None]]]] = [
    (re.compile(r"operator '([\w:.]+)' to ONNX opset version \d+ is not supported\. "
                r"Support for this operator was added in version (\d+)"), lambda m: (m[1], int(m[2]))),
    (re.compile(r"ONNX export of (\w+) in opset \d+\..*?Please try opset version (\d+)", re.S),
     lambda m: (m[1], int(m[2]))),
    (re.compile(r"ONNX export failed on (\w+), which is not implemented for opset \d+"),
     lambda m: (f"aten::{m[1]}", None)),
    (re.compile(r"No Previous Version of (\w+) exists"), lambda m: (m[1], _first_opset(m[1]))),
    (re.compile(r"No Adapter From Version \$(\d+) for (\w+)"), lambda m: (m[2], int(m[1]))),
    (re.compile(r"for operator (\w+)"), lambda m: (m[1], None)),
    (re.compile(r"of operator \((\w+)\)"), lambda m: (m[1], None)),
]


def _opset_cause(e: BaseException | None) -> tuple[str, int | None] | None:
    """(operator, first opset that has it) when an exporter's or converter's error says which operator failed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = ANSI.sub("", str(e))
        for pattern, parse in _OPSET_MESSAGES:
            m = pattern.search(text)
            if m:
                return parse(m)
        e = e.__cause__ or e.__context__
    return None


def _default_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _to_opset(proto, opset: int):
    """``proto`` at exactly ``opset`` (onnx's version converter when the exporter wrote another), else OpsetError."""
    import onnx.version_converter

    used = _default_opset(proto)
    if used == opset:
        return proto
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter asserts in C++ with the operator in the text
        cause = _opset_cause(e)
        op, since = cause if cause else (None, None)
        detail = (f"operator {op} needs opset {since}" if op and since else f"operator {op}" if op
                  else first_line(e)[:200])
        raise OpsetError(f"it writes opset {used} and onnx cannot convert that to {opset} ({detail})", op, since) from None
    if _default_opset(converted) != opset:
        raise OpsetError(f"it writes opset {used} and onnx's converter gave {_default_opset(converted)}, not {opset}")
    return converted




@dataclass
class ExportResult:
    out: Path
    exporter: str
    opset: int
    max_abs_diff: float
    size_bytes: int
    timing: dict[str, dict[str, float]] | None  # runtime -> {"latency_ms", "throughput", "runs1", "runs64"}
    threads: int
    trained: Trained




















# --------------------------------------------------------------------------- metadata
def output_layout(s) -> str:
    if s.task == "classification":
        return f"columns 0..{s.num_classes - 1}: logits of the {s.num_classes} classes (softmax -> probabilities)"
    reg = (f"standardized regression target '{s.target_key or s.label_key}' "
           f"(physical = output * {s.target_std:.10g} + {s.target_mean:.10g})")
    if s.task == "regression":
        return f"column 0: {reg}"
    return (f"columns 0..{s.num_classes - 1}: logits of the {s.num_classes} classes (softmax -> probabilities); "
            f"column {s.num_classes}: {reg}")


def inference_steps(s) -> list[str]:
    """The deterministic transforms a raw image needs before the model, in order (no training flips)."""
    steps = s.transform_steps()
    if s.mean is not None and s.std is not None:
        steps.append("(x - e2e.mean[c]) / e2e.std[c] per " + ("feature" if s.kind == "objects" else "channel"))
    return steps


def raw_output_layout(s) -> str:
    target = f"the regression target '{s.target_key or s.label_key}' in its physical units"
    if s.task == "classification":
        return f"columns 0..{s.num_classes - 1}: probabilities of the {s.num_classes} classes"
    if s.task == "regression":
        return f"column 0: {target}"
    return f"columns 0..{s.num_classes - 1}: probabilities of the {s.num_classes} classes; column {s.num_classes}: {target}"


def input_layout(t: Trained) -> str:
    s = t.setup
    if t.form == "raw":
        steps = inference_steps(s)
        if t.inputs == "objects":
            return (f"objects: float32 (batch, {s.img_size[0]}, {s.img_size[1]}) as '{s.image_key}' of the data file, "
                    f"raw features (the graph standardizes them); mask: bool (batch, {s.img_size[0]}), true = real "
                    "object")
        return (f"image: float32 (batch, {', '.join(map(str, t.raw_row or ()))}) as '{s.image_key}' of the data "
                f"file ({s.layout}), every channel, in the file's units; inside the graph: channels "
                f"{list(s.channels)} in that order, {', '.join(steps) if steps else 'no preprocessing'}")
    if t.inputs == "objects":
        norm = "standardized per feature with e2e.mean/e2e.std" if s.mean is not None else "unnormalized"
        return (f"objects: float32 (batch, {s.img_size[0]}, {s.img_size[1]}) = (batch, objects, features), {norm}, "
                "padding rows zero; mask: bool (batch, objects), true = real object")
    steps = inference_steps(s)
    if t.inputs == "patches":
        p = t.params.get("patch_size", "p")
        return (f"patches: float32 (batch, tokens, {s.in_chans}*{p}*{p}) = the non-empty {p}x{p} patches of the "
                f"preprocessed image padded to the patch grid, each flattened as (channel, row, column), zero-padded "
                f"to the batch's most; index: int64 (batch, tokens) their row-major grid positions; valid: bool "
                f"(batch, tokens), true = a real patch; channels {list(s.channels)} of '{s.image_key}' in that order; "
                f"preprocessing: {', '.join(steps) if steps else 'none'} (trainables.inference.patch_list builds it)")
    if t.inputs == "hits":
        from trainables.families.hit_transformer import input_hits

        return (f"hits: float32 (batch, {input_hits(t.model)}, 4) = (channel, row, column, energy) of the most "
                f"energetic non-empty pixels of the image, zero-padded, energy = (x - empty[c]) * std[c] with x the "
                f"pixel after the preprocessing below and empty[c] that of an empty cell (the pixel after the "
                f"per-pixel transforms, minus their value of 0; GeV for generated data), rows along eta, columns "
                f"along phi of the {s.img_size[0]}x{s.img_size[1]} image; mask: bool (batch, {input_hits(t.model)}), "
                f"true = real hit; channels {list(s.channels)} of '{s.image_key}' ({s.layout} in the file) in that "
                f"order; preprocessing: {', '.join(steps) if steps else 'none'} "
                "(trainables.families.hit_transformer.hit_list builds it from a preprocessed image)")
    return (f"image: float32 (batch, {s.in_chans}, {s.img_size[0]}, {s.img_size[1]}) channels first; channels "
            f"{list(s.channels)} of '{s.image_key}' ({s.layout} in the file) in that order; preprocessing: "
            f"{', '.join(steps) if steps else 'none'} (trainables.data.transforms.preprocess)")


def metadata(t: Trained, exporter: str, opset: int, diff: float) -> dict[str, str]:
    s = t.setup

    def js(v):
        return json.dumps(v, default=str, sort_keys=True)

    return {
        "e2e.family": t.family,
        "e2e.task": s.task,
        "e2e.num_classes": str(s.num_classes),
        "e2e.num_outputs": str(sum(_outputs(s).values())),
        "e2e.outputs": output_layout(s) if t.form != "raw" else raw_output_layout(s),
        "e2e.target_mean": f"{s.target_mean:.10g}",
        "e2e.target_std": f"{s.target_std:.10g}",
        "e2e.inputs": ",".join(input_names(t)),
        "e2e.input_form": t.form,
        "e2e.input_layout": input_layout(t),
        "e2e.file_key": s.image_key,
        "e2e.file_layout": s.layout if s.kind != "objects" else "objects",
        "e2e.channels": js(list(s.channels)),
        "e2e.mean": js(s.mean),
        "e2e.std": js(s.std),
        "e2e.preprocessing": ", ".join(inference_steps(s)) or "none",
        "e2e.data": js({k: v for k, v in t.data.items() if k not in ("train", "val", "test")}),
        "e2e.params": js(t.params),
        "e2e.epoch": str(t.epoch),
        "e2e.metrics": js({k: v for k, v in t.metrics.items() if isinstance(v, (int, float))}),
        "e2e.source": t.source,
        "e2e.exporter": exporter,
        "e2e.opset": str(opset),
        "e2e.parity_max_abs_diff": f"{diff:.3g}",
    }


# --------------------------------------------------------------------------- exporters
def _export_torchscript(t: Trained, example: tuple, path: Path, opset: int | None):
    import onnx
    import torch

    names = input_names(t)
    torch.onnx.export(t.model, example, str(path), dynamo=False, input_names=names, output_names=["output"],
                      dynamic_axes={n: {0: "batch", 1: "tokens"} if t.inputs == "patches" and n != "output"
                                    else {0: "batch"} for n in [*names, "output"]},
                      opset_version=opset or 17, do_constant_folding=True)
    return onnx.load(str(path))


def _export_dynamo(t: Trained, example: tuple, path: Path, opset: int | None):
    import torch

    batch = torch.export.Dim("batch", min=1)
    tokens = torch.export.Dim("tokens", min=1)
    shapes = tuple({0: batch, 1: tokens} if t.inputs == "patches" else {0: batch} for _ in example)
    prog = torch.onnx.export(t.model, example, None, dynamo=True, input_names=input_names(t), output_names=["output"],
                             dynamic_shapes=shapes, opset_version=opset, optimize=True)
    assert prog is not None  # dynamo=True returns the ONNXProgram
    return prog.model_proto


EXPORT_FUNCS: dict[str, Callable] = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


@contextlib.contextmanager
def _silent_fds():
    """Discard what C++ code writes to file descriptors 1 and 2 (the TorchScript exporter prints whole graphs)."""
    import sys

    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _quiet(fn, *args):
    """Run an exporter without its warnings, progress lines and graph dumps."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), _silent_fds():
        warnings.simplefilter("ignore")
        return fn(*args)


def _reason(e: BaseException) -> str:
    """The innermost cause's type and first line (exporters wrap the real error)."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    return f"{type(e).__name__}: {first_line(e)}"[:400]


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _attempt(t: Trained, exporter: str, tmp: Path, opset: int | None, threads: int):
    """Export with one exporter, write ``tmp``, check it in onnxruntime -> (session, opset, max |diff|)."""
    import onnx
    import torch

    example = tuple(torch.from_numpy(a) for a in random_inputs(t, EXAMPLE_BATCH, seed=1))
    proto = _quiet(EXPORT_FUNCS[exporter], t, example, tmp, opset)
    if opset is not None:  # the dynamo exporter falls back to its own opset (18) when it cannot down-convert
        proto = _quiet(_to_opset, proto, opset)
    used = _default_opset(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    sess = _session(tmp, threads)
    xs = random_inputs(t, PARITY_EVENTS, seed=0)
    names = input_names(t)
    ref, got = torch_forward(t, xs), sess.run(["output"], dict(zip(names, xs)))[0]
    ref1, got1 = torch_forward(t, [a[:1] for a in xs]), sess.run(["output"], {n: a[:1] for n, a in zip(names, xs)})[0]
    if got.shape != ref.shape or got1.shape != ref1.shape:
        raise ValueError(f"onnxruntime output shape {got.shape} differs from PyTorch's {ref.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(ref1).all()):
        raise ValueError("PyTorch outputs NaN/Inf on the random parity inputs")
    diff = float(max(np.abs(got - ref).max(), np.abs(got1 - ref1).max()))
    real = real_inputs(t, PARITY_EVENTS)  # rows of the search's data file, when it is readable here
    if real is not None and len(real[0]):
        ref_r, got_r = torch_forward(t, real), sess.run(["output"], dict(zip(names, real)))[0]
        diff = max(diff, float(np.abs(got_r - ref_r).max()))
    if not diff <= PARITY_TOL:
        raise ParityError(f"onnxruntime differs from PyTorch by up to {diff:.3g} on {PARITY_EVENTS} random events"
                          f"{' and rows of the data file' if real is not None else ''} (limit {PARITY_TOL:g})")
    for k, v in metadata(t, exporter, used, diff).items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "e2e-search"
    proto.doc_string = f"e2e-search {t.family} ({t.setup.task}); inputs, outputs and preprocessing in metadata e2e.*"
    onnx.save(proto, str(tmp))
    if opset is not None and used != opset:  # never write another opset than the one asked for
        raise OpsetError(f"it wrote opset {used}, not {opset}")
    return _session(tmp, threads), used, diff


def _opset_failure(e: BaseException, opset: int | None) -> OpsetError | None:
    """An exporter's failure at a requested opset, as an OpsetError when it is about the opset."""
    if opset is None or isinstance(e, ParityError):
        return None
    if isinstance(e, OpsetError):
        return e
    text = ANSI.sub("", str(e))
    if re.search(r"Unsupported onnx_opset_version", text):  # newer than the exporter knows: no newer one helps
        return OpsetError(f"it does not write opset {opset} (newer than it knows)", too_new=True)
    cause = _opset_cause(e)
    if cause is None:
        return None
    op, since = cause
    if since is None and opset >= 17:  # an operator failing at a recent opset is not about the opset
        return None
    return OpsetError(f"operator {op} needs a newer opset" if since is None else f"operator {op} needs opset {since}",
                      op, since)


def _lowest_opset(t: Trained, order: list[str], opset: int, hints: dict[str, int | None], tmp: Path,
                  threads: int) -> tuple[str, int] | None:
    """The lowest opset above ``opset`` that an exporter of ``order`` writes and onnxruntime reproduces."""
    best: tuple[str, int] | None = None
    for name in order:
        if name not in hints:  # this exporter failed for another reason than the opset
            continue
        cand = max(opset + 1, hints[name] or opset + 1)
        for _ in range(OPSET_PROBES):
            if cand > opset_max() or (best is not None and cand >= best[1]):
                break
            try:
                _attempt(t, name, tmp, cand, threads)
            except Exception as e:  # noqa: BLE001 - try the opset the failure points to, else the next one
                why = e if isinstance(e, OpsetError) else _opset_failure(e, cand)
                cand = max(cand + 1, (why.since if why is not None else None) or cand + 1)
                continue
            finally:
                if tmp.exists():
                    tmp.unlink()
            best = (name, cand)
            break
    return best


# --------------------------------------------------------------------------- timing
def _median_seconds(fn: Callable[[], Any], runs: int, budget_s: float) -> tuple[float, int]:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def benchmark(t: Trained, sess, runs: int, budget_s: float = BENCH_BUDGET_S) -> dict[str, dict[str, float]]:
    """CPU latency per event at batch 1 (median of ``runs``) and throughput at batch 64, onnxruntime and eager."""
    import torch

    names = input_names(t)
    xs = random_inputs(t, PARITY_EVENTS, seed=2)
    one = [a[:1] for a in xs]
    runs64 = max(3, runs // 5)
    out: dict[str, dict[str, float]] = {}
    feeds = ({n: a for n, a in zip(names, one)}, {n: a for n, a in zip(names, xs)})
    tl, n1 = _median_seconds(lambda: sess.run(["output"], feeds[0]), runs, budget_s)
    tb, n64 = _median_seconds(lambda: sess.run(["output"], feeds[1]), runs64, budget_s)
    out["onnxruntime"] = {"latency_ms": tl * 1e3, "throughput": len(xs[0]) / tb, "runs1": n1, "runs64": n64}
    t_one = [torch.from_numpy(a) for a in one]
    t_all = [torch.from_numpy(a) for a in xs]
    with torch.inference_mode():
        tl, n1 = _median_seconds(lambda: t.model(*t_one), runs, budget_s)
        tb, n64 = _median_seconds(lambda: t.model(*t_all), runs64, budget_s)
    out["pytorch eager"] = {"latency_ms": tl * 1e3, "throughput": len(xs[0]) / tb, "runs1": n1, "runs64": n64}
    return out


# --------------------------------------------------------------------------- entry point
def _checked_dest(fmt: str, exporter: str, runs: int, out: str, opset: int | None, inputs: str = "auto") -> Path:
    """The output file, once the request is one this installation can carry out (UserError otherwise)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'{did_you_mean(fmt, FORMATS)}", key="--format")
    if inputs not in INPUT_FORMS:
        raise UserError(f"unknown input form '{inputs}'{did_you_mean(inputs, INPUT_FORMS)}; use "
                        f"{' | '.join(INPUT_FORMS)}", key="--inputs")
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}'{did_you_mean(exporter, EXPORTERS)}", key="--exporter")
    if runs < 0:
        raise UserError(f"--runs must be >= 0 (got {runs})", key="--runs")
    dest = Path(out)
    if dest.is_dir():
        raise UserError(f"'{out}' is a folder; give the output file, e.g. {dest / 'model.onnx'}", key="--out")
    if not dest.parent.is_dir():
        raise UserError(f"folder '{dest.parent}' does not exist; create it first", key="--out")
    import importlib.util

    lacking = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if lacking:
        raise UserError(f"ONNX export needs {' and '.join(lacking)}; pip install onnx onnxruntime onnxscript",
                        key="--format")
    if opset is not None and not OPSET_MIN <= opset <= opset_max():
        raise UserError(f"{opset} is not an ONNX opset this installation can write; use --opset {OPSET_MIN}.."
                        f"{opset_max()}, or leave --opset out for the exporter's default", key="--opset")
    return dest


def export(source: str, out: str, fmt: str = "onnx", *, tracking_uri: str | None = None, opset: int | None = None,
           exporter: str = "auto", runs: int = 50, inputs: str = "auto") -> ExportResult:
    """Export ``source`` to ``out`` in the input form ``inputs`` (INPUT_FORMS); raises UserError (nothing written)
    on bad input, a failed export or parity."""
    dest = _checked_dest(fmt, exporter, runs, out, opset, inputs)
    import torch

    with tempfile.TemporaryDirectory(prefix="e2e-export-") as dl:
        t = as_raw(load_trained(*fetch_checkpoint(source, tracking_uri, dl)), inputs)
    threads = torch.get_num_threads()
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    reasons: list[str] = []
    opset_hints: dict[str, int | None] = {}  # exporter -> the opset its failure points to (None: not said)
    too_new = False  # an exporter does not know the requested opset
    try:
        for name in order:
            try:
                sess, used, diff = _attempt(t, name, tmp, opset, threads)
            except ParityError as e:
                reasons.append(f"{name} exporter: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - any exporter/runtime failure is a refusal
                why = _opset_failure(e, opset)
                if why is not None:
                    too_new |= why.too_new
                    if not why.too_new:
                        opset_hints[name] = why.since
                reasons.append(f"{name} exporter: {why if why is not None else _reason(e)}")
                continue
            timing = benchmark(t, sess, runs) if runs > 0 else None
            del sess
            os.replace(tmp, dest)
            _log_beside(source, tracking_uri, dest)
            return ExportResult(out=dest, exporter=name, opset=used, max_abs_diff=diff, size_bytes=dest.stat().st_size,
                                timing=timing, threads=threads, trained=t)
        if opset is not None and opset_hints:
            lowest = _lowest_opset(t, order, opset, opset_hints, tmp, threads)
            fix = (f"the lowest opset that works is {lowest[1]} ({lowest[0]} exporter): use --opset {lowest[1]} or higher"
                   if lowest else "use a higher --opset")
            raise UserError(f"cannot write opset {opset} for family '{t.family}' ({t.source}): {'; '.join(reasons)}; "
                            f"{fix}, or leave --opset out for the exporter's default", key="--opset")
        if too_new:
            raise UserError(f"cannot write opset {opset} for family '{t.family}' ({t.source}): {'; '.join(reasons)}; "
                            "use a lower --opset or --exporter dynamo", key="--opset")
    finally:
        if tmp.exists():
            tmp.unlink()
    raise UserError(f"cannot export family '{t.family}' ({t.source}) to ONNX: {'; '.join(reasons)}")


def _log_beside(source: str, tracking_uri: str | None, dest: Path) -> None:
    """The ONNX file logged to the source's MLflow run (``onnx/``); the file is written either way, a store that
    refuses the artifact is one warning line."""
    try:
        rid = log_beside(source, tracking_uri, dest)
    except Exception as e:  # noqa: BLE001 - the export succeeded; its copy in MLflow is a convenience
        print(f"warning: {dest.name} not logged to the source's MLflow run ({first_line(e)})", file=sys.stderr)
        return
    if rid:
        print(f"logged {dest.name} to run {rid} (artifact onnx/{dest.name})", file=sys.stderr)


def summary(r: ExportResult) -> str:
    t = r.trained
    s = t.setup
    n_params = sum(p.numel() for p in t.model.parameters())
    shapes = (f"objects (batch, {s.img_size[0]}, {s.img_size[1]}) float32 + mask (batch, {s.img_size[0]}) bool"
              if t.inputs == "objects" else f"image (batch, {s.in_chans}, {s.img_size[0]}, {s.img_size[1]}) float32")
    if t.inputs == "hits":
        from trainables.families.hit_transformer import input_hits

        n_hits = input_hits(t.model)
        shapes = f"hits (batch, {n_hits}, 4) float32 + mask (batch, {n_hits}) bool"
    if t.inputs == "patches":
        shapes = "patches (batch, tokens, C*p*p) float32 + index (batch, tokens) int64 + valid (batch, tokens) bool"
    if t.form == "raw":
        shapes = (f"raw objects (batch, {s.img_size[0]}, {s.img_size[1]}) float32 + mask (batch, {s.img_size[0]}) bool"
                  if t.inputs == "objects" else
                  f"raw image (batch, {', '.join(map(str, t.raw_row or ()))}) float32 as '{s.image_key}' ({s.layout})")
    lines = [
        f"source: {t.source}: {t.family}, {n_params:,} parameters, epoch {t.epoch}, task {s.task}",
        f"wrote {r.out} ({r.size_bytes / 1e6:.2f} MB, {r.exporter} exporter, opset {r.opset}): "
        f"{shapes} -> output (batch, {sum(_outputs(s).values())}) float32"
        + (" (probabilities / physical target)" if t.form == "raw" else ""),
        f"parity: max |onnxruntime - PyTorch| = {r.max_abs_diff:.2g} on {PARITY_EVENTS} random events, rows of the "
        f"data file (when readable) and batch 1 (limit {PARITY_TOL:g})",
    ]
    if "pretrain_loss" in t.metrics and "val_loss" not in t.metrics:
        lines.append("note: this checkpoint is from the pretraining phase: its task head is untrained")
    if r.timing:
        n1, n64 = (max(int(v[k]) for v in r.timing.values()) for k in ("runs1", "runs64"))
        lines.append(f"CPU timing, {r.threads} threads (median of up to {n1} runs at batch 1 and {n64} at batch "
                     f"{PARITY_EVENTS}, at most {BENCH_BUDGET_S:g} s each):")
        lines.append(f"  {'runtime':14}  {'batch 1 ms/event':>16}  {f'batch {PARITY_EVENTS} events/s':>17}")
        for name, v in r.timing.items():
            lines.append(f"  {name:14}  {v['latency_ms']:>16.3f}  {v['throughput']:>17,.0f}")
    return "\n".join(lines)


def _outputs(s) -> dict[str, int]:
    from trainables.core.model import task_outputs

    return task_outputs(s)
