"""ONNX exports where CMSSW runs them (issue 28): each family's default export (raw rows in, probabilities out;
the hit list for hit_transformer) loaded in ONNX Runtime 1.20.1, the version CMSSW moved to in 2025, in a
throwaway venv, its outputs compared with the installed onnxruntime's on rows of a data file; and the CPU
latency per jet at batch 1 and 64 of the dense and sparse forms against ResNet-15.

    flock /tmp/heavy.lock .venv/bin/python bench/onnx_runtime.py --data e2e_runs/data/top_vs_qcd_8k.h5

Models have random weights (latency and runtime agreement do not depend on training) and each family's default
parameters, built for the data file's shape. Writes the table to stdout and, with --out, JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result

from trainables.core.layout import CHECKPOINT_FILE
from trainables.core.model import build_model
from trainables.data.images import setup_for_file

IMAGE_FAMILIES = {
    "resnet15": {},
    "vit": {},
    "vit_nonempty": {"token_keep": "nonempty"},
    "hit_transformer": {},
    "swin": {},
    "cait": {},
    "mae": {},
    "hybrid_vit": {},
    "coatnet": {},
    "maxvit": {},
}
OBJECT_FAMILIES = {"event_transformer": {}, "deepsets": {}}
SPARSE = {"vit_nonempty_sparse": "vit_nonempty"}
"""Rows exporting a family's sparse form (``--inputs sparse``): the kept patches, a dynamic token count."""
RUNNER = """
import json, sys, numpy as np, onnxruntime as ort
spec = json.load(open(sys.argv[1]))
out = {}
for name, case in spec.items():
    sess = ort.InferenceSession(case["model"], providers=["CPUExecutionProvider"])
    feed = {k: np.load(v) for k, v in case["inputs"].items()}
    out[name] = sess.run(["output"], feed)[0].tolist()
print(json.dumps({"version": ort.__version__, "outputs": out}))
"""


def _checkpoint(folder: Path, family: str, params: dict, setup) -> Path:
    fam = "vit" if family == "vit_nonempty" else family
    torch.manual_seed(0)
    model = build_model(fam, params, setup)
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in setup.to_dict().items() if k not in ("train", "val", "test")}
    path = folder / CHECKPOINT_FILE
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1, "family": fam,
                "params": params, "data": data, "metrics": {}}, path)
    return path


def _objects_file(path: Path, n: int = 512) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (n, 6, 4)).astype(np.float32)
    mask = np.ones((n, 6), np.uint8)
    mask[::3, 4:] = 0
    x[mask == 0] = 0
    with h5py.File(path, "w") as f:
        f["X_objects"], f["mask"], f["y"] = x, mask, (np.arange(n) % 2).astype(np.int64)
    return path


def _object_setup(path: Path):
    from trainables.data.setup import DataSetup

    return DataSetup(path=str(path), image_key="X_objects", label_key="y", layout="objects", channels=[0, 1, 2, 3],
                     in_chans=4, img_size=(6, 4), task="classification", num_classes=2, train=[], val=[],
                     test=list(range(64)), mean=[0.0] * 4, std=[1.0] * 4, kind="objects", mask_key="mask")


def _real_latency(sess, t, names: list[str], runs: int) -> dict[str, float]:
    """onnxruntime on rows of the data file: ms per jet at batch 1 (each jet alone, its own token count for the
    sparse forms; the median over up to ``runs`` jets) and jets/s at batch 64."""
    from e2e_search.record.checkpoints import inputs_of_rows
    from trainables.inference import raw_rows

    s = t.setup
    rows = list(s.test)[:64] or list(range(64))
    raw = raw_rows(s, rows)
    one = []
    for i in range(min(runs, len(rows))):
        feed = dict(zip(names, inputs_of_rows(t, [a[i : i + 1] for a in raw])))
        sess.run(["output"], feed)  # warm
        t0 = time.perf_counter()
        sess.run(["output"], feed)
        one.append(time.perf_counter() - t0)
    batch = dict(zip(names, inputs_of_rows(t, raw)))
    sess.run(["output"], batch)
    t0, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t0 < 2.0:
        sess.run(["output"], batch)
        n += 1
    return {"latency_ms": 1e3 * float(np.median(one)), "throughput": len(rows) * n / (time.perf_counter() - t0),
            "tokens": float(np.mean([inputs_of_rows(t, [a[i : i + 1] for a in raw])[0].shape[1]
                                     for i in range(min(16, len(rows)))])) if t.inputs in ("patches", "hits") else 0}


def _ort_venv(version: str, where: Path) -> Path:
    py = where / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"onnxruntime=={version}", "numpy"], check=True)
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="an E2E image file (e.g. e2e_runs/data/top_vs_qcd_8k.h5)")
    ap.add_argument("--families", default=",".join([*IMAGE_FAMILIES, *SPARSE, *OBJECT_FAMILIES]))
    ap.add_argument("--ort", default="1.20.1", help="the ONNX Runtime version to check (CMSSW's)")
    ap.add_argument("--venv", default="/tmp/ort_cmssw", help="where the throwaway venv goes")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    from e2e_search.export.onnx import export
    from e2e_search.record.checkpoints import input_names, real_inputs

    print(machine(), flush=True)
    image_setup = setup_for_file(args.data, val_fraction=0.0, test_fraction=0.02)
    rows, spec = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        objects = _object_setup(_objects_file(tmp / "events.h5"))
        for family in args.families.split(","):
            base = SPARSE.get(family, family)
            params = IMAGE_FAMILIES.get(base, OBJECT_FAMILIES.get(base))
            setup = objects if base in OBJECT_FAMILIES else image_setup
            ckpt = _checkpoint(tmp / family, base, dict(params or {}), setup)
            out = tmp / f"{family}.onnx"
            t0 = time.perf_counter()
            try:
                r = export(str(ckpt), str(out), runs=0, inputs="sparse" if family in SPARSE else "auto")
            except Exception as e:  # noqa: BLE001 - a family that does not export: say why, go on
                print(f"{family}: export failed: {e}", flush=True)
                rows.append({"family": family, "error": str(e)[:300]})
                continue
            t = r.trained
            feed = dict(zip(input_names(t), real_inputs(t, 64) or []))
            spec[family] = {"model": str(out), "inputs": {}}
            for k, v in feed.items():
                np.save(tmp / f"{family}_{k}.npy", v)
                spec[family]["inputs"][k] = str(tmp / f"{family}_{k}.npy")
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            now = sess.run(["output"], feed)[0]
            ort_now = _real_latency(sess, t, input_names(t), args.runs)
            form = {"hits": "sparse (hit list)", "patches": "sparse (kept patches)"}.get(t.inputs, t.form)
            rows.append({"family": family, "form": form, "opset": r.opset,
                         "params": sum(p.numel() for p in t.model.parameters()), "export_s": time.perf_counter() - t0,
                         "ms_batch1": ort_now["latency_ms"], "jets_s_batch64": ort_now["throughput"],
                         "tokens": ort_now["tokens"],
                         "now": now.tolist()})
            print(f"{family}: exported ({rows[-1]['form']}, opset {r.opset}), "
                  f"{ort_now['latency_ms']:.3f} ms/jet at batch 1 on the file's jets", flush=True)
        (tmp / "spec.json").write_text(json.dumps(spec))
        (tmp / "run.py").write_text(RUNNER)
        py = _ort_venv(args.ort, Path(args.venv))
        res = subprocess.run([str(py), str(tmp / "run.py"), str(tmp / "spec.json")], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"onnxruntime {args.ort} failed: {res.stderr[-2000:]}")
        old = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nONNX Runtime {old['version']} (throwaway venv) vs {ort.__version__} (installed), 64 rows of {args.data}\n")
    print(f"| family | input form | opset | parameters | max abs diff {old['version']} vs {ort.__version__} | "
          "ms/jet batch 1 | jets/s batch 64 | tokens/jet |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['family']} | export failed: {row['error'][:80]} | | | | | | |")
            continue
        diff = float(np.abs(np.asarray(old["outputs"][row["family"]]) - np.asarray(row.pop("now"))).max())
        row["max_abs_diff_cmssw"] = diff
        print(f"| {row['family']} | {row['form']} | {row['opset']} | {row['params']:,} | {diff:.2g} | "
              f"{row['ms_batch1']:.3f} | {row['jets_s_batch64']:,.0f} | {row['tokens'] or ''} |")
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
