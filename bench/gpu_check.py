"""The one prepared device check (issue 26): fits one call of the device tool (under 8 minutes on an H100) and
prints, side by side, on the training device (the GPU when there is one):

* training jets/s at the E2E size (125x125x3) of ``resnet15`` (width 16), ``vit`` with all 625 5x5 patches, ``vit``
  with the non-empty patches only (RoPE), and ``hit_transformer`` (defaults: 128 hits, pair features; and with 64
  hits, without pair features, with 5x5 towers), each fed
  from the sparse cache's rows on the device as a trial feeds it (dense batches for the image families, hit lists
  for the hit family), AdamW, bf16 autocast on a GPU; best of 3 timed windows after warm-up;
* ONNX Runtime latency per jet at batch 1 on the CPU of each model as exported (a hit list + mask for
  ``hit_transformer``);
* the sparse cache's batches per second on the device: dense (B, 3, 125, 125) batches and hit lists;
* one warm trial's overhead: ``bench/orchestration.py --trials 2 --epochs 1 --runners auto`` (real Ray Tune +
  MLflow), its per-trial overhead line.

    .venv/bin/python bench/gpu_check.py                          # on the device (sized for one call under 8 min)
    .venv/bin/python bench/gpu_check.py --n 512 --steps 3 --batch 32 --skip-orchestration   # on 2 CPU cores

Jets are synthetic at the measured occupancy of generated top/QCD jets (0.29% of the pixels, about 136 hits per
jet, exponential energies near the centre): the rates depend on the hit count, not on the physics.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainables.core.batches import SparseRows  # noqa: E402
from trainables.core.model import build_model  # noqa: E402
from trainables.data.setup import DataSetup  # noqa: E402

MODELS = {
    "resnet15": ("resnet15", {"width": 16}),
    "vit all p5": ("vit", {"patch_size": 5, "depth": 4, "embed_dim": 64, "num_heads": 4}),
    "vit nonempty p5": ("vit", {"patch_size": 5, "depth": 4, "embed_dim": 64, "num_heads": 4,
                                "token_keep": "nonempty", "pos_embed": "rope"}),
    "hit_transformer": ("hit_transformer", {}),
    "hit 64 hits": ("hit_transformer", {"max_hits": 64}),
    "hit no pairs": ("hit_transformer", {"pair_features": False}),
    "hit 5x5 towers": ("hit_transformer", {"merge": 5}),
}


def synthetic_rows(n: int, device, seed: int = 0) -> SparseRows:
    """CSR rows of n jets (3x125x125) with ~136 hits each near the centre."""
    rng = np.random.default_rng(seed)
    offsets, index, values = [0], [], []
    for _ in range(n):
        k = int(rng.integers(60, 220))
        h = np.clip(rng.normal(62, 12, k), 0, 124).astype(int)
        w = np.clip(rng.normal(62, 12, k), 0, 124).astype(int)
        c = rng.integers(0, 3, k)
        flat = np.unique(c * 125 * 125 + h * 125 + w)
        index.append(flat.astype(np.int32))
        values.append(rng.exponential(5.0, len(flat)).astype(np.float32) + 0.1)
        offsets.append(offsets[-1] + len(flat))
    return SparseRows(np.asarray(offsets, np.int64), np.concatenate(index), np.concatenate(values), (3, 125, 125),
                      0.0, device, [0.02, 0.05, 0.01], [0.5, 1.5, 0.3])


def setup() -> DataSetup:
    return DataSetup(path="-", image_key="X_jets", label_key="y", layout="channels_last", channels=[0, 1, 2],
                     in_chans=3, img_size=(125, 125), task="classification", num_classes=2, train=[], val=[], test=[],
                     mean=[0.02, 0.05, 0.01], std=[0.5, 1.5, 0.3])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(name: str, rows: SparseRows, batch: int, steps: int, device) -> float:
    family, params = MODELS[name]
    torch.manual_seed(0)
    model = build_model(family, params, setup()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    hits = family == "hit_transformer"
    y = torch.randint(0, 2, (batch,), device=device)
    n = len(rows)

    def step(i: int) -> None:
        pos = torch.arange(i * batch, (i + 1) * batch) % n
        x = list(rows.hits(pos)) if hits else [rows.dense(pos)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(*x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):
        step(i)
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        sync(device)
        best = max(best, steps * batch / (time.perf_counter() - t0))
    return best


def onnx_latency_ms(name: str, rows: SparseRows, runs: int) -> float:
    """ONNX Runtime CPU latency per jet at batch 1 (median of ``runs``, the machine's threads) of the model
    exported as ``e2e-search export`` writes it (TorchScript exporter, opset 17): a dense image input for the
    image families, a hit-list input (128 hits + mask) for hit_transformer."""
    import os
    import tempfile
    import warnings

    import onnxruntime as ort

    warnings.filterwarnings("ignore")  # the TorchScript exporter's tracer warnings
    from trainables.families.hit_transformer import input_hits

    family, params = MODELS[name]
    torch.manual_seed(0)
    model = build_model(family, params, setup()).eval()
    pos = torch.arange(1)
    if family == "hit_transformer":
        hits, mask = rows.hits(pos.cpu())
        n = input_hits(model)
        hits = torch.nn.functional.pad(hits.cpu(), (0, 0, 0, n - hits.shape[1]))
        mask = torch.nn.functional.pad(mask.cpu(), (0, n - mask.shape[1]))
        example, names = (hits, mask), ["hits", "mask"]
    else:
        example, names = (rows.dense(pos).cpu(),), ["image"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model, example, path, dynamo=False, input_names=names, output_names=["output"],
                          dynamic_axes={k: {0: "batch"} for k in [*names, "output"]}, opset_version=17)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in zip(names, example)}
    for _ in range(3):
        sess.run(["output"], feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(["output"], feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def batch_rate(rows: SparseRows, batch: int, steps: int, device, hits: bool) -> float:
    n = len(rows)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        pos = torch.arange(i * batch, (i + 1) * batch) % n
        rows.hits(pos) if hits else rows.dense(pos)
    sync(device)
    return steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096, help="synthetic jets in the cache (default 4096)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed window (default 20)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--onnx-runs", type=int, default=50, help="ONNX Runtime batch-1 runs per model (0: skip)")
    ap.add_argument("--skip-orchestration", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.n} synthetic jets, batch {args.batch}", flush=True)
    t0 = time.time()
    rows = synthetic_rows(args.n, device)
    print(f"sparse rows on the device: {rows.offsets[-1].item() / args.n:.0f} hits per jet, built in "
          f"{time.time() - t0:.1f} s", flush=True)
    print(f"\n{'model':18} {'train jets/s':>14} {'ONNX ms/jet (CPU, batch 1)':>28}", flush=True)
    for m in args.models.split(","):
        try:
            rate = train_rate(m, rows, args.batch, args.steps, device)
            ms = onnx_latency_ms(m, rows, args.onnx_runs) if args.onnx_runs else float("nan")
            print(f"{m:18} {rate:>14,.0f} {ms:>28.2f}", flush=True)
        except Exception as e:  # noqa: BLE001 - one model failing (memory) must not hide the others
            print(f"{m:18} {'failed':>14}  {type(e).__name__}: {str(e)[:160]}", flush=True)
    print(f"\n{'sparse cache':18} {'batches/s':>14} {'jets/s':>14}", flush=True)
    for kind in ("dense", "hits"):
        r = batch_rate(rows, args.batch, max(args.steps, 10), device, kind == "hits")
        print(f"{kind:18} {r:>14,.1f} {r * args.batch:>14,.0f}", flush=True)
    if not args.skip_orchestration:
        print("\nwarm trial overhead (bench/orchestration.py --trials 2 --epochs 1 --runners auto):", flush=True)
        subprocess.call([sys.executable, str(ROOT / "bench/orchestration.py"), "--trials", "2", "--epochs", "1",
                         "--runners", "auto"], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
