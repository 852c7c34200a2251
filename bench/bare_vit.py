"""The issue's reference figures: a bare timm ViT training step, eager vs torch.compile, side by side.

    .venv/bin/python bench/bare_vit.py                       # ViT-Ti/5, S/5, S/25, B/5 on the GPU
    .venv/bin/python bench/bare_vit.py --models vit_s25 --batch 32 --steps 3   # a CPU smoke run

timm ``VisionTransformer`` on 3x125x125 images (2 classes), bf16 autocast (on a GPU), fused AdamW (on a GPU),
random tensors already on the device; batch 256 (S/25: 1024, B/5: 128, as in the reference). Per model: eager,
then compiled (``torch.compile``, default mode); best of 3 timed windows after warm-up. The first compiled
step's time is the compile cost a trial pays once. Prints img/s, the reference, measured/reference, the
compile speed-up, and the bf16 model TFLOP/s (6 x params x tokens per image, plus attention).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import VIT, bare_loop, fmt, machine, release, write_result
from timm.models.vision_transformer import VisionTransformer

# The issue's figures (H100, img/s): (batch, eager, compiled).
REFERENCE = {"vit_ti5": (256, 3563, 5548), "vit_s5": (256, 1930, 2591), "vit_s25": (1024, 31423, 43596),
             "vit_b5": (128, 809, 1010)}


def train_flops_per_image(d: int, depth: int, patch: int, size: int = 125, chans: int = 3) -> float:
    """Forward + backward FLOPs of one image: 6 x (matmul params x tokens) + 3 x 4 x tokens^2 x d per block."""
    n = (size // patch) ** 2 + 1
    per_block = 12 * d * d  # qkv 3d^2 + proj d^2 + mlp 8d^2
    dense = 2 * n * (depth * per_block + patch * patch * chans * d)
    attn = depth * 4 * n * n * d
    return 3 * (dense + attn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit_ti5,vit_s5,vit_s25,vit_b5")
    ap.add_argument("--batch", type=int, default=None, help="override the reference batch of every model")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"])
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    print(machine(), flush=True)
    rows = []
    for name in args.models.split(","):
        d, depth, heads, patch = VIT[name]
        batch = args.batch or REFERENCE.get(name, (256,))[0]
        row = {"model": name, "batch": batch}
        for comp in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
            torch.manual_seed(0)
            model = VisionTransformer(img_size=125, patch_size=patch, in_chans=3, num_classes=2, embed_dim=d,
                                      depth=depth, num_heads=heads, mlp_ratio=4.0)
            r = bare_loop(model, batch=batch, shape=(3, 125, 125), device=device, compile=comp, steps=args.steps,
                          warmup=5 if device == "cuda" else 1)
            release(model)
            key = "compiled" if comp else "eager"
            row[key] = r
            ref = REFERENCE.get(name)
            vs = f", reference {fmt(ref[2 if comp else 1])} -> x{r['img_s'] / ref[2 if comp else 1]:.2f}" if ref else ""
            tflops = r["img_s"] * train_flops_per_image(d, depth, patch) / 1e12
            row[key]["tflops"] = tflops
            print(f"{name:8} batch {batch:5} {key:8}: {fmt(r['img_s']):>7} img/s ({tflops:.0f} TFLOP/s; first step "
                  f"{r['first_step_s']:.1f} s){vs}", flush=True)
        rows.append(row)
    print(f"\n{machine()}")
    print(f"{'model':8} {'batch':>5} {'eager':>8} {'ref':>7} {'x':>5} {'compiled':>9} {'ref':>7} {'x':>5} "
          f"{'compile gain':>12} {'compile s':>9}")
    for r in rows:
        ref = REFERENCE.get(r["model"], (0, float("nan"), float("nan")))
        e, c = r.get("eager", {}).get("img_s", float("nan")), r.get("compiled", {}).get("img_s", float("nan"))
        cs = r.get("compiled", {}).get("first_step_s", float("nan"))
        print(f"{r['model']:8} {r['batch']:5} {fmt(e):>8} {fmt(ref[1]):>7} {e / ref[1]:5.2f} {fmt(c):>9} "
              f"{fmt(ref[2]):>7} {c / ref[2]:5.2f} {c / e:12.2f} {cs:9.1f}")
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
