"""Tokens kept, training img/s and validation AUC of ``vit`` with ``token_keep: nonempty`` against ``all``.

    .venv/bin/python bench/token_keep.py                 # 5,000 generated jets, 4 epochs each (2 CPU cores: ~30 min)
    .venv/bin/python bench/token_keep.py --n 2000 --epochs 1 --rounds 2     # a smoke run

Both models are the same ``vit`` (width, depth, heads, patch 5, the same initial weights: the state dicts
are interchangeable), built by the training core's ``build_model`` for the data (so the empty-cell value
after per-channel normalization is the one a trial uses). On generated 125x125x3 top/QCD jets (Pythia 8,
``e2e-search data generate top_vs_qcd``; generated once and kept at ``--data``):

1. tokens: non-empty 5x5 patches per jet (what ``nonempty`` keeps), and the tokens a training batch really
   computes per image (the fullest jet of the batch sets the padded length);
2. speed, side by side: ``--rounds`` rounds, each timing ``--steps`` training steps (forward, backward, AdamW)
   of one model then the other on the same batches; the median img/s of the rounds;
3. quality: both trained ``--epochs`` epochs on the same batches in the same order (AdamW, warm-up + cosine),
   validation AUC after each epoch, with its statistical error (Hanley & McNeil 1982) and the paired
   bootstrap error of the difference on the same validation jets. The wall-clock img/s of those epochs is
   printed too.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from _common import machine
from sklearn.metrics import roc_auc_score

from trainables.core.model import build_model
from trainables.data.setup import DataSetup

REPO = Path(__file__).resolve().parent.parent


def ensure_data(path: Path, n: int, seed: int, workers: int) -> float:
    """Generate ``n`` top/QCD jets into ``path`` unless it holds at least that many; returns the seconds spent."""
    if path.exists():
        with h5py.File(path, "r") as f:
            if len(f["y"]) >= n:
                return 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("e2e-search")
    cmd = [str(exe) if exe.exists() else "e2e-search", "data", "generate", "top_vs_qcd", "--n", str(n), "--out",
           str(path), "--seed", str(seed), "--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return time.perf_counter() - t0


def load(path: Path, n: int, val_fraction: float, seed: int):
    """(x_train, y_train, x_val, y_val, setup): channels-first float32, normalized per channel with the
    training jets' mean and std (as ``normalize: per_channel``)."""
    with h5py.File(path, "r") as f:
        X = f["X_jets"][:n]                                                   # (n, H, W, C) channels-last
        y = f["y"][:n].astype(np.int64)
    x = np.ascontiguousarray(np.moveaxis(X, -1, 1), dtype=np.float32)        # (n, C, H, W)
    del X
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(val_fraction * len(y)))
    val, train = order[:n_val], order[n_val:]
    xt = x[train]
    mean = xt.mean(axis=(0, 2, 3), dtype=np.float64)
    std = xt.std(axis=(0, 2, 3), dtype=np.float64)
    del xt
    x -= mean.reshape(1, -1, 1, 1).astype(np.float32)
    x /= std.reshape(1, -1, 1, 1).astype(np.float32)
    C, H, W = x.shape[1:]
    setup = DataSetup(path=str(path), image_key="X_jets", label_key="y", layout="channels_last",
                      channels=list(range(C)), in_chans=C, img_size=(H, W), task="classification", num_classes=2,
                      train=[], val=[], test=[], mean=[float(m) for m in mean], std=[float(s) for s in std])
    return x[train], y[train], x[val], y[val], setup


def models(setup: DataSetup, params: dict) -> dict[str, torch.nn.Module]:
    out = {}
    for keep in ("all", "nonempty"):
        torch.manual_seed(0)
        out[keep] = build_model("vit", {**params, "token_keep": keep}, setup)
    out["nonempty"].load_state_dict(out["all"].state_dict())  # the same initial weights
    return out


def batches(n: int, batch: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[a:a + batch] for a in range(0, n - batch + 1, batch)]


@torch.no_grad()
def token_counts(model: torch.nn.Module, xs: list[np.ndarray], train_batches: list[np.ndarray]):
    """(non-empty patches per jet of xs[0] then xs[1] ... (N,), padded tokens per image of each training batch,
    the batches indexing xs[0])."""
    fit, vit = model
    counts = []
    for x in xs:
        for a in range(0, len(x), 256):
            valid = vit.keep(fit(torch.from_numpy(x[a:a + 256])))[2]          # (B, K)
            counts.append(valid.sum(1).numpy())
    counts = np.concatenate(counts)
    padded = np.array([counts[idx].max() for idx in train_batches], dtype=np.float64)
    return counts, padded


def make_optimizer(model: torch.nn.Module, lr: float, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total_steps - warm))))
    return opt, sched


def step(model, opt, sched, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def speed(nets: dict, x: np.ndarray, y: np.ndarray, batch: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """img/s per round of each model, alternating, on the same batches (fresh optimizers, weights restored)."""
    rates: dict[str, list[float]] = {k: [] for k in nets}
    saved = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in nets.items()}
    opts = {k: make_optimizer(m, 1e-3, 10**6)[0] for k, m in nets.items()}
    sets = batches(len(y), batch, seed=99)
    for m in nets.values():
        m.train()
    for k, m in nets.items():  # warm-up
        for idx in sets[:2]:
            step(m, opts[k], None, torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
    for r in range(rounds):
        chosen = sets[(r * steps) % max(1, len(sets) - steps):][:steps]
        for k, m in nets.items():
            t0 = time.perf_counter()
            for idx in chosen:
                step(m, opts[k], None, torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
            rates[k].append(len(chosen) * batch / (time.perf_counter() - t0))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()), flush=True)
    for k, m in nets.items():
        m.load_state_dict(saved[k])
    return rates


@torch.no_grad()
def scores(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(torch.from_numpy(x[a:a + batch])), -1)[:, 1].numpy() for a in range(0, len(x), batch)]
    model.train()
    return np.concatenate(out)


def auc_error(auc: float, y: np.ndarray) -> float:
    """Hanley & McNeil (1982) standard error of a ROC AUC on n1 signal and n0 background examples."""
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0))


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    """Standard deviation of AUC(a) - AUC(b) over bootstrap resamples of the same validation jets."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    return float(np.std(diffs))


def train(nets: dict, xt, yt, xv, yv, batch: int, epochs: int, lr: float):
    """Train each model ``epochs`` epochs on the same batches; per model: (AUC per epoch, img/s, scores)."""
    results = {}
    for k, m in nets.items():
        torch.manual_seed(1)
        per_epoch = [batches(len(yt), batch, seed=100 + e) for e in range(epochs)]
        opt, sched = make_optimizer(m, lr, sum(len(b) for b in per_epoch))
        m.train()
        aucs, seconds, seen = [], 0.0, 0
        for e, sets in enumerate(per_epoch):
            t0 = time.perf_counter()
            losses = [step(m, opt, sched, torch.from_numpy(xt[idx]), torch.from_numpy(yt[idx])) for idx in sets]
            seconds += time.perf_counter() - t0
            seen += len(sets) * batch
            s = scores(m, xv)
            aucs.append(roc_auc_score(yv, s))
            print(f"  {k}: epoch {e + 1}/{epochs}, loss {np.mean(losses):.4f}, val AUC {aucs[-1]:.4f}, "
                  f"{len(sets) * batch / (time.perf_counter() - t0):.1f} img/s", flush=True)
        results[k] = (aucs, seen / seconds, s)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO / "e2e_runs" / "data" / "bench_token_keep_top_vs_qcd.h5"))
    ap.add_argument("--n", type=int, default=5000, help="jets used (generated first if the file has fewer)")
    ap.add_argument("--gen-seed", type=int, default=7)
    ap.add_argument("--val-fraction", type=float, default=0.3)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), f"| {torch.get_num_threads()} threads", flush=True)
    gen_s = ensure_data(Path(args.data), args.n, args.gen_seed, workers=min(2, os.cpu_count() or 1))
    if gen_s:
        print(f"generated {args.n} jets into {args.data} in {gen_s:.0f} s", flush=True)
    xt, yt, xv, yv, setup = load(Path(args.data), args.n, args.val_fraction, seed=0)
    params = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads, "patch_size": 5}
    nets = models(setup, params)
    L = 25 * 25
    counts, padded = token_counts(nets["nonempty"], [xt, xv], batches(len(yt), args.batch, seed=100))
    print(f"non-empty 5x5 patches per jet (of {L}): median {np.median(counts):.0f}, mean {counts.mean():.1f}, "
          f"min {counts.min()}, max {counts.max()}; tokens per image in a batch of {args.batch} "
          f"(padded to its fullest jet): mean {padded.mean():.1f}", flush=True)
    print(f"speed: {args.rounds} rounds x {args.steps} steps of batch {args.batch}, side by side", flush=True)
    rates = speed(nets, xt, yt, args.batch, args.steps, args.rounds)
    print(f"training: {args.epochs} epochs each on {len(yt)} jets, validation on {len(yv)}", flush=True)
    res = train(nets, xt, yt, xv, yv, args.batch, args.epochs, args.lr)
    diff_err = paired_bootstrap(yv, res["nonempty"][2], res["all"][2])
    prefix = 1
    print()
    print(f"vit embed_dim {args.embed_dim}, depth {args.depth}, heads {args.heads}, patch 5, batch {args.batch}, "
          f"{len(yt)}/{len(yv)} train/val generated 125x125x3 top/QCD jets, {torch.get_num_threads()} CPU threads")
    print()
    print("| token_keep | tokens per image | train img/s (median of rounds) | train img/s (epochs) | "
          f"val AUC after {args.epochs} epochs |")
    print("|---|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in rates.items()}
    toks = {"all": f"{prefix + L}", "nonempty": f"{prefix} + {padded.mean():.1f} (jets: median {np.median(counts):.0f})"}
    for k in ("all", "nonempty"):
        aucs, ips, _ = res[k]
        print(f"| `{k}` | {toks[k]} | {med[k]:.1f} | {ips:.1f} | {aucs[-1]:.4f} ± {auc_error(aucs[-1], yv):.4f} |")
    d = res["nonempty"][0][-1] - res["all"][0][-1]
    print()
    print(f"speed-up nonempty/all: {med['nonempty'] / med['all']:.2f}x (rounds), "
          f"{res['nonempty'][1] / res['all'][1]:.2f}x (epochs); AUC nonempty - all = {d:+.4f} ± {diff_err:.4f} "
          f"(paired bootstrap over the validation jets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
