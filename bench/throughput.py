"""Training images/s of the trainable (Ray Train, reading an HDF5 file) vs a bare PyTorch loop, side by side.

    .venv/bin/python bench/throughput.py --model vit_s5 --n 8192 --epochs 4 --batch 256 \
        --cache device --compile both          # on a GPU machine
    .venv/bin/python bench/throughput.py --model vit_ti25 --n 1536 --epochs 3 --batch 64 \
        --cache memory --compile off           # on 2 CPU cores

One run writes a synthetic E2E file (``--n`` sparse 3x125x125 jets, gzip-4 + shuffle, one jet per chunk,
like ``e2e-search data generate``; or reads ``--data``), then for each compile setting:

* **bare**: the same model (built by the ``vit`` family from the same parameters), the same batch, random
  tensors already on the device, bf16 autocast on a GPU, fused AdamW on a GPU, gradient clipping 1.0 as the
  trainable does; best of 3 timed windows after warm-up.
* **trainable**: ``ray.train.torch.TorchTrainer(trainables.trial.train_worker)`` with one worker, as a trial
  runs it (reading the file, caching it as ``--cache`` says, validating, checkpointing every epoch). Its
  figure is the loop's own ``train_samples_per_s`` (training steps only), median over the epochs after the
  first (the first pays compilation and warm-up); the epoch wall time (with validation, checkpoint, report)
  is printed beside it.

Prints one row per setting with the ratio trainable / bare, and writes them as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import VIT, bare_loop, data_setup, fmt, machine, release, vit_params, write_jets, write_result


class _Collect:
    """A Ray Train UserCallback (runs in the Train controller) appending each report's metrics to a file."""

    def __new__(cls, path: str):
        from ray.train import UserCallback

        class Collect(UserCallback):
            def __init__(self, p: str):
                self.p = p

            def after_report(self, run_context, metrics, checkpoint):
                with open(self.p, "a") as f:
                    f.write(json.dumps(metrics[0], default=float) + "\n")

        return Collect(path)


def run_trainable(setup, params: dict, *, epochs: int, use_gpu: bool, cpus: float, loader_workers: int,
                  storage: str) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainables.core.contract import TrialConfig
    from trainables.trial import train_worker

    log = os.path.join(storage, f"metrics_{uuid.uuid4().hex[:8]}.jsonl")
    per = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=TrialConfig(family="vit", params=params, data=setup.to_dict(), max_epochs=epochs,
                                      metric="val_loss", mode="min", metrics=["val_loss"], cpus=cpus,
                                      loader_workers=loader_workers).model_dump(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=per),
        run_config=RunConfig(name=f"bench_{uuid.uuid4().hex[:8]}", storage_path=storage,
                             callbacks=[_Collect(log)], checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    n, bs = len(setup.train), params["batch_size"]
    seen = n // bs * bs if n > bs else n  # the loop drops the last partial batch
    later = rows[1:] or rows
    return {"img_s": float(np.median([r["train_samples_per_s"] for r in later])),
            "epoch1_img_s": rows[0]["train_samples_per_s"],
            "epoch_wall_s": float(np.median([r["epoch_time_s"] for r in later])),
            "train_s": float(np.median([seen / r["train_samples_per_s"] for r in later])),
            "fit_wall_s": wall, "epochs": len(rows), "val_loss": rows[-1].get("val_loss")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_s5", choices=sorted(VIT))
    ap.add_argument("--n", type=int, default=8192, help="jets in the synthetic file (train = 95%%)")
    ap.add_argument("--data", help="an existing E2E HDF5 file instead of a synthetic one")
    ap.add_argument("--limit", type=int, help="use only this many jets of the file (data.limit)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache", default="device", choices=["none", "memory", "device"])
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--cpus", type=float, default=None, help="CPUs of the Train worker (default: all cores)")
    ap.add_argument("--compile", default="off", choices=["off", "on", "both"])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--bare-steps", type=int, default=None, help="steps per timed window of the bare loop "
                    "(default 30 on a GPU, 5 on the CPU)")
    ap.add_argument("--bare-after", action="store_true", help="time the bare loop again after the trainable and "
                    "use the mean of both (for a noisy, shared CPU)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if use_gpu else "cpu"
    cpus = args.cpus or float(os.cpu_count() or 1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    print(machine(), flush=True)
    tmp = tempfile.mkdtemp(prefix="e2e_bench_")
    path = args.data
    if path and not os.path.exists(path):  # write it here, to be reused by later runs
        t0 = time.perf_counter()
        write_jets(path, args.n)
        print(f"wrote {args.n} jets to {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    if path is None:
        path = os.path.join(tmp, "jets.h5")
        t0 = time.perf_counter()
        write_jets(path, args.n)
        print(f"wrote {args.n} jets to {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    params = {**vit_params(args.model), "batch_size": args.batch, "precision": args.precision, "lr": 1e-4}
    _, setup = data_setup(path, cache=args.cache, loader_workers=args.loader_workers, batch_size=args.batch,
                          params=params, limit=args.limit)
    shape = (setup.in_chans, *setup.img_size)
    torch.set_num_threads(max(1, int(cpus)))
    ray.init(num_cpus=max(cpus, os.cpu_count() or 1) + 1, num_gpus=1 if use_gpu else 0, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING", _temp_dir=os.environ.get("E2E_BENCH_RAY_TMP", "/tmp/rb"))
    rows = []
    for comp in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        p = {**params, "compile": comp}
        from trainables.core.model import build_model

        torch.manual_seed(0)
        model = build_model("vit", p, setup)
        n_params = sum(t.numel() for t in model.parameters())
        bare = bare_loop(model, batch=args.batch, shape=shape, device=device, precision=args.precision,
                         compile=comp, grad_clip=1.0, steps=args.bare_steps or (30 if use_gpu else 5),
                         warmup=5 if use_gpu else 1)
        release(model)
        print(f"bare   {args.model} compile={comp}: {fmt(bare['img_s'])} img/s "
              f"(median {fmt(bare['img_s_median'])}; first step {bare['first_step_s']:.1f} s)", flush=True)
        tr = run_trainable(setup, p, epochs=args.epochs, use_gpu=use_gpu, cpus=cpus,
                           loader_workers=args.loader_workers, storage=os.path.join(tmp, "ray"))
        if args.bare_after:
            torch.manual_seed(0)
            model = build_model("vit", p, setup)
            again = bare_loop(model, batch=args.batch, shape=shape, device=device, precision=args.precision,
                              compile=comp, grad_clip=1.0, steps=args.bare_steps or (30 if use_gpu else 5),
                              warmup=5 if use_gpu else 1)
            release(model)
            print(f"bare   {args.model} compile={comp} again: {fmt(again['img_s'])} img/s", flush=True)
            bare = {**bare, "before_img_s": bare["img_s"], "after_img_s": again["img_s"],
                    "img_s": (bare["img_s"] + again["img_s"]) / 2}
        print(f"trainable {args.model} compile={comp} cache={args.cache} readers={args.loader_workers}: "
              f"{fmt(tr['img_s'])} img/s (epoch 1: {fmt(tr['epoch1_img_s'])}; epoch wall {tr['epoch_wall_s']:.2f} s "
              f"of which training {tr['train_s']:.2f} s; fit {tr['fit_wall_s']:.0f} s)", flush=True)
        rows.append({"model": args.model, "params_M": n_params / 1e6, "batch": args.batch, "compile": comp,
                     "precision": args.precision, "cache": args.cache, "loader_workers": args.loader_workers,
                     "device": device, "n_train": len(setup.train), "bare": bare, "trainable": tr,
                     "ratio": tr["img_s"] / bare["img_s"]})
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # the synthetic file and the runs' checkpoints
    print(f"\n{machine()}")
    print(f"{'model':10} {'compile':8} {'cache':7} {'bare img/s':>11} {'trainable img/s':>16} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:10} {str(r['compile']):8} {r['cache']:7} {fmt(r['bare']['img_s']):>11} "
              f"{fmt(r['trainable']['img_s']):>16} {r['ratio']:6.3f}")
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
