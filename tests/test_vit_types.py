"""Vision-transformer families: vit (softmax / linear / window attention), swin, cait, hybrid_vit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.families.cait import CaitParams, build_cait
from trainables.families.hybrid_vit import HybridVitParams, build_hybrid_vit
from trainables.families.swin import SwinParams, build_swin
from trainables.families.vit import VitParams, build_vit
from trainables.layers.vit_blocks import LinearAttention, WindowAttention, window_mask
from trainables.layers.windows import stage_windows, swin_grid

FAMILIES = {
    "vit": (VitParams, build_vit),
    "swin": (SwinParams, build_swin),
    "cait": (CaitParams, build_cait),
    "hybrid_vit": (HybridVitParams, build_hybrid_vit),
}
CONFIGS = [  # (family, params): every attention type of vit, every new family at its defaults
    ("vit", {"attention": "softmax"}),
    ("vit", {"attention": "linear"}),
    ("vit", {"attention": "window"}),
    ("swin", {}),
    ("cait", {}),
    ("hybrid_vit", {}),
]
IDS = [f"{f}-{p.get('attention', 'default')}" for f, p in CONFIGS]
SHAPES = [(3, 125, 125), (2, 32, 32), (8, 125, 125)]  # (C, H, W)
TASKS = [{"classification": 2}, {"classification": 3}, {"regression": 1}, {"classification": 2, "regression": 1}]


def build(family: str, params: dict, shape: tuple[int, int, int], tasks: dict[str, int] | None = None,
          seed: int = 0) -> torch.nn.Module:
    params_cls, build_fn = FAMILIES[family]
    tasks = tasks or {"classification": 2}
    torch.manual_seed(seed)
    return build_fn(params_cls(**params), in_chans=shape[0], img_size=shape[1:],
                    num_outputs=sum(tasks.values()), tasks=tasks)


def task_loss(out: torch.Tensor, tasks: dict[str, int]) -> torch.Tensor:
    """Sum over the output blocks: cross-entropy for classification, MSE for regression."""
    loss, col = out.new_zeros(()), 0
    for name, k in tasks.items():
        block = out[:, col : col + k]                                        # (B, k)
        if name == "classification":
            loss = loss + F.cross_entropy(block, torch.arange(len(out)) % k)
        else:
            loss = loss + F.mse_loss(block, torch.randn_like(block))
        col += k
    return loss


def train_step(model: torch.nn.Module, shape: tuple[int, int, int], tasks: dict[str, int]) -> None:
    model.train()
    before = [q.detach().clone() for q in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, *shape)                                               # (B, C, H, W)
    out = model(x)
    assert out.shape == (2, sum(tasks.values()))
    loss = task_loss(out, tasks)
    assert torch.isfinite(loss)
    loss.backward()
    for name, q in model.named_parameters():
        assert q.grad is not None, f"{name} got no gradient (unused parameter)"
        assert torch.isfinite(q.grad).all(), name
    opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("family,params", CONFIGS, ids=IDS)
def test_trains_one_step_on_any_image_shape(family, params, shape):
    tasks = {"classification": 2}
    train_step(build(family, params, shape, tasks), shape, tasks)


@pytest.mark.parametrize("tasks", TASKS, ids=lambda t: "+".join(f"{k}{v}" for k, v in t.items()))
@pytest.mark.parametrize("family,params", CONFIGS, ids=IDS)
def test_trains_one_step_for_every_task_layout(family, params, tasks):
    train_step(build(family, params, (2, 32, 32), tasks), (2, 32, 32), tasks)


def test_families_are_registered_with_a_description():
    from trainables.registry import get_family

    for name, (params_cls, build_fn) in FAMILIES.items():
        fam = get_family(name)
        assert fam.build is build_fn and fam.params is params_cls and fam.inputs == "image"
        assert fam.description and "\n" not in fam.description


# ---- attention types of vit -------------------------------------------------------------------------


@pytest.mark.parametrize("family,params,calls", [
    ("vit", {"attention": "softmax", "depth": 2}, 2),
    ("vit", {"attention": "softmax", "depth": 2, "pool": "map"}, 3),  # + attention pooling
    ("vit", {"attention": "window", "depth": 2}, 2),
    ("vit", {"attention": "linear", "depth": 2}, 0),
    ("swin", {"depth": 2, "stages": 2}, 4),
    ("cait", {"depth": 2, "class_attn_layers": 2}, 2),  # class attention is fused, talking heads cannot be
    ("hybrid_vit", {"depth": 3}, 3),
])
def test_fused_scaled_dot_product_attention_is_used(monkeypatch, family, params, calls):
    model = build(family, params, (2, 32, 32)).eval()
    seen: list[torch.Tensor | None] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model(torch.randn(1, 2, 32, 32))
    assert len(seen) == calls
    if params.get("attention") == "window":
        assert all(m is not None and m.dtype == torch.bool and not m.all() for m in seen)


def test_linear_attention_matches_naive_quadratic_formula():
    torch.manual_seed(0)
    attn = LinearAttention(8, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 5, 8)                                                 # (B, N, D)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)      # (B, h, N, d) each
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    sim = phi_q @ phi_k.transpose(-1, -2)                                    # (B, h, N, N), all > 0
    naive = (sim @ v) / (sim.sum(-1, keepdim=True) + attn.eps)               # (B, h, N, d)
    naive = attn.proj(naive.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), naive, atol=1e-5, rtol=1e-5)
    # a different mechanism from softmax attention with the same weights
    soft = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8)
    assert not torch.allclose(attn(x), attn.proj(soft), atol=1e-3)


def test_linear_attention_is_stable_on_large_and_half_precision_inputs():
    torch.manual_seed(0)
    attn = LinearAttention(8, num_heads=2)
    x = 1e3 * torch.randn(1, 400, 8)
    assert torch.isfinite(attn(x)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(1, 50, 8))
    assert torch.isfinite(out).all()


def test_window_mask_tiles_the_grid_with_smaller_last_windows():
    m = window_mask((5, 7), 3, num_prefix_tokens=1)                         # (36, 36)
    assert m.shape == (36, 36) and m[0].all() and m[:, 0].all()
    sizes = m[1:, 1:].sum(1).reshape(5, 7)                                   # patches per window, per patch
    rows, cols = torch.tensor([3, 3, 3, 2, 2]), torch.tensor([3, 3, 3, 3, 3, 3, 1])
    assert torch.equal(sizes, rows[:, None] * cols[None, :])
    assert torch.equal(m, m.T)


def features(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    fit, vit = model
    return vit.forward_features(fit(x))


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_window_covering_the_grid_equals_softmax_with_the_same_weights(pool):
    shape = (2, 30, 35)  # patch 5 -> 6 x 7 grid
    soft = build("vit", {"attention": "softmax", "pool": pool, "depth": 2}, shape).eval()
    win = build("vit", {"attention": "window", "window_size": 7, "pool": pool, "depth": 2}, shape, seed=1).eval()
    small = build("vit", {"attention": "window", "window_size": 3, "pool": pool, "depth": 2}, shape).eval()
    lin = build("vit", {"attention": "linear", "pool": pool, "depth": 2}, shape).eval()
    for other in (win, small, lin):
        other.load_state_dict(soft.state_dict())  # strict: all attention types share timm's names
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(win(x), soft(x), atol=1e-5, rtol=1e-5)
        ref = features(soft, x)                                              # (B, N, D), O(1) after the norm
        torch.testing.assert_close(features(win, x), ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(features(small, x), ref, atol=1e-3)
        assert not torch.allclose(features(lin, x), ref, atol=1e-3)


def _same_window(i: int, j: int, gw: int, w: int) -> bool:
    return (i // gw) // w == (j // gw) // w and (i % gw) // w == (j % gw) // w


def test_window_attention_ignores_tokens_outside_the_window():
    torch.manual_seed(0)
    gh, gw, w, d = 5, 7, 3, 8
    attn = WindowAttention(d, num_heads=2, qkv_bias=True)
    attn.set_window((gh, gw), w, num_prefix_tokens=1)
    x = torch.randn(1, 1 + gh * gw, d, requires_grad=True)                  # (1, 1 + N, D), class token first
    for i in range(gh * gw):
        (grad,) = torch.autograd.grad(attn(x)[0, 1 + i].sum(), x)
        moved = grad[0].abs().sum(-1) > 0                                    # (1 + N,)
        assert moved[0], "the class token is seen by every patch"
        expected = torch.tensor([_same_window(i, j, gw, w) for j in range(gh * gw)])
        assert torch.equal(moved[1:], expected), i
    (grad,) = torch.autograd.grad(attn(x)[0, 0].sum(), x)
    assert (grad[0].abs().sum(-1) > 0).all(), "the class token sees every patch"


def test_window_vit_without_class_token_keeps_windows_independent_through_all_blocks():
    # pool avg: no class token, so no path between windows even across blocks and MLPs
    p, gh, gw, w = 2, 5, 7, 3
    model = build("vit", {"attention": "window", "window_size": w, "pool": "avg", "patch_size": p, "depth": 2,
                          "embed_dim": 16, "num_heads": 2}, (1, gh * p, gw * p)).eval()
    fit, vit = model
    x = torch.randn(1, 1, gh * p, gw * p, requires_grad=True)
    for i in (0, 10, 20, 34):
        (grad,) = torch.autograd.grad(vit.forward_features(fit(x))[0, i].sum(), x)
        moved = grad[0, 0].abs().reshape(gh, p, gw, p).sum((1, 3)).flatten() > 0  # (N,) per patch
        expected = torch.tensor([_same_window(i, j, gw, w) for j in range(gh * gw)])
        assert torch.equal(moved, expected), i


# ---- params are really used -------------------------------------------------------------------------


def n_params(model: torch.nn.Module) -> int:
    return sum(q.numel() for q in model.parameters())


STRUCTURAL = [  # changing these changes the parameter count
    ("vit", {"patch_size": 4}), ("vit", {"depth": 2}), ("vit", {"embed_dim": 32}), ("vit", {"mlp_ratio": 2.0}),
    ("vit", {"pool": "map"}), ("vit", {"patch_fit": "crop"}),
    ("swin", {"patch_size": 2}), ("swin", {"embed_dim": 48}), ("swin", {"stages": 3}), ("swin", {"depth": 1}),
    ("swin", {"num_heads": 4}), ("swin", {"window_size": 2}), ("swin", {"mlp_ratio": 2.0}),
    ("cait", {"patch_size": 4}), ("cait", {"embed_dim": 32}), ("cait", {"depth": 1}),
    ("cait", {"class_attn_layers": 1}), ("cait", {"num_heads": 2}), ("cait", {"mlp_ratio": 2.0}),
    ("hybrid_vit", {"stem_channels": 16}), ("hybrid_vit", {"stem_layers": 3}), ("hybrid_vit", {"stem_stride": 2}),
    ("hybrid_vit", {"patch_size": 1}), ("hybrid_vit", {"depth": 2}), ("hybrid_vit", {"embed_dim": 32}),
    ("hybrid_vit", {"pool": "avg"}),
]
BEHAVIOURAL = [  # same parameter shapes and initial weights, different function
    ("vit", {"attention": "linear"}), ("vit", {"attention": "window"}), ("vit", {"num_heads": 2}),
    ("vit", {"drop_path": 0.5}),
    ("swin", {"pool": "max"}), ("swin", {"drop_path": 0.5}),
    ("cait", {"layer_scale": 0.5}), ("cait", {"drop_path": 0.5}),
    ("hybrid_vit", {"num_heads": 2}), ("hybrid_vit", {"drop_path": 0.5}), ("hybrid_vit", {"pool": "map"}),
]


@pytest.mark.parametrize("family,change", STRUCTURAL, ids=lambda v: str(v))
def test_structural_params_change_the_parameter_count(family, change):
    shape = (2, 32, 32)
    assert n_params(build(family, change, shape)) != n_params(build(family, {}, shape))


@pytest.mark.parametrize("family,change", BEHAVIOURAL, ids=lambda v: str(v))
def test_other_params_change_the_outputs(family, change):
    shape = (2, 32, 32)
    base, changed = build(family, {}, shape), build(family, change, shape)
    x = torch.randn(4, *shape)
    outs = []
    for model in (base, changed):
        torch.manual_seed(1)
        outs.append(model.train()(x))
    assert not torch.allclose(*outs, atol=1e-5)


def test_vit_window_size_changes_the_outputs():
    shape = (2, 35, 35)  # 7 x 7 patches
    outs = [build("vit", {"attention": "window", "window_size": w}, shape).eval()(torch.ones(1, *shape))
            for w in (2, 4, 7)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-5) and not torch.allclose(outs[1], outs[2], atol=1e-5)


# ---- family-specific geometry -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 32, 33, 63, 125])
@pytest.mark.parametrize("patch,window,stages", [(4, 4, 2), (5, 5, 2), (2, 7, 4), (5, 7, 3), (3, 6, 1), (1, 2, 3)])
def test_swin_grid_is_the_smallest_that_every_stage_tiles_exactly(size, patch, window, stages):
    g, sides = swin_grid(size, patch, window, stages)
    assert g >= math.ceil(size / patch) and g % 2 ** (stages - 1) == 0
    for i, w in enumerate(sides):
        res = g // 2**i
        assert res % w == 0 and (w == res <= window or math.ceil(window / 2) <= w <= window)
    assert all(stage_windows(s, window, stages) is None for s in range(math.ceil(size / patch), g))


@pytest.mark.parametrize("shape", [(3, 125, 125), (2, 32, 32), (1, 7, 9)])
@pytest.mark.parametrize("params", [{}, {"stages": 3, "window_size": 7, "patch_size": 5}, {"stages": 4}])
def test_swin_blocks_never_pad_inside_timm(shape, params):
    model = build("swin", params, shape)
    h, w = model.fit.out_size
    assert h >= shape[1] and w >= shape[2]
    p = SwinParams(**params)
    assert h % p.patch_size == 0 and w % p.patch_size == 0
    blocks = [blk for layer in model.swin.layers for blk in layer.blocks]
    assert len(blocks) == p.depth * p.stages
    for blk in blocks:
        assert all(r % ws == 0 for r, ws in zip(blk.input_resolution, blk.window_size)), blk.input_resolution
    if shape[1] == 125:
        assert any(any(blk.shift_size) for blk in blocks), "shifted windows are used on full-size images"


def test_cait_has_class_attention_layers_with_layer_scale():
    model = build("cait", {"depth": 3, "class_attn_layers": 2, "layer_scale": 0.2}, (3, 125, 125))
    fit, cait = model
    assert fit.out_size == (125, 125) and len(cait.blocks) == 3 and len(cait.blocks_token_only) == 2
    assert torch.allclose(cait.blocks[0].gamma_1, torch.full_like(cait.blocks[0].gamma_1, 0.2))
    assert cait.patch_embed.num_patches == 25 * 25


@pytest.mark.parametrize("stride,layers,patch,grid", [(4, 2, 2, 16), (8, 1, 1, 16), (1, 2, 5, 25), (2, 3, 4, 16)])
def test_hybrid_vit_stem_and_token_grid(stride, layers, patch, grid):
    model = build("hybrid_vit", {"stem_stride": stride, "stem_layers": layers, "patch_size": patch}, (3, 125, 125))
    fit, vit = model
    assert all(s % (stride * patch) == 0 and s >= 125 for s in fit.out_size)
    convs = [m for m in vit.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == max(layers, int(math.log2(stride)))
    assert sum(c.stride[0] == 2 for c in convs) == int(math.log2(stride))
    assert tuple(vit.patch_embed.grid_size) == (grid, grid)
