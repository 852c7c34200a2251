"""Issue 16: today's ViT techniques as search dimensions, the coatnet and maxvit families, and a ViT that keeps
only its non-empty patches (``token_keep: nonempty``). CPU, no Ray; tiny models (width 16, depth 1)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import BaseModel
from timm.models.cait import Cait
from timm.models.vision_transformer import Block, VisionTransformer

from tests.test_export import IMAGE, check_onnx, make_checkpoint, run_export
from trainables.attention.rollout import attention_rollout
from trainables.core.model import build_model, empty_pixel
from trainables.data.setup import DataSetup
from trainables.data.transforms import preprocess
from trainables.families.coatnet import CoatnetParams, coatnet_blocks
from trainables.layers.maxxvit import coatnet_size, maxvit_size
from trainables.layers.vit_common import FitToPatches
from trainables.layers.vit_model import NonEmptyPatches, Vit
from trainables.registry import Capabilities, get_family, register_family

SHAPES = {"32x32x2": (2, 32, 32), "125x125x3": (3, 125, 125), "125x125x8": (8, 125, 125)}
TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2}
TINY_MAXX = {"embed_dim": 16, "dim_head": 8, "stem_width": 8, "depths": [1, 1, 1]}
OPTIONS = [  # (family, params): every new option alone, the new families, and everything at once
    ("vit", {"pos_embed": "rope"}), ("vit", {"pos_embed": "sincos"}), ("vit", {"pos_embed": "none"}),
    ("vit", {"reg_tokens": 2}), ("vit", {"mlp": "swiglu"}), ("vit", {"qk_norm": True}),
    ("vit", {"layer_scale": 1e-5}),
    ("vit", {"token_keep": "nonempty"}),
    ("vit", {"token_keep": "nonempty", "pos_embed": "rope", "reg_tokens": 1, "mlp": "swiglu", "qk_norm": True,
             "layer_scale": 0.1, "pool": "avg"}),
    ("vit", {"token_keep": "nonempty", "attention": "window", "window_size": 3, "pool": "map"}),
    ("vit", {"token_keep": "nonempty", "attention": "linear", "pos_embed": "sincos"}),
    ("hybrid_vit", {"pos_embed": "rope", "reg_tokens": 2, "mlp": "swiglu", "qk_norm": True, "layer_scale": 0.1,
                    "stem_channels": 8, "stem_layers": 1}),
    ("cait", {"mlp": "swiglu", "class_attn_layers": 1}),
    ("mae", {"mlp": "swiglu", "qk_norm": True, "layer_scale": 0.1, "decoder_dim": 8}),
    ("coatnet", TINY_MAXX), ("coatnet", {**TINY_MAXX, "stem_stride": 1, "conv_stages": 1, "depths": [1, 2]}),
    ("maxvit", TINY_MAXX), ("maxvit", {**TINY_MAXX, "stem_stride": 1, "window_size": 7, "depths": [2]}),
]


def _params(family: str, params: dict) -> dict:
    base = {} if family in ("coatnet", "maxvit") else dict(TINY)
    if family in ("vit", "cait", "mae"):
        base["patch_size"] = 5
    return {**base, **params}


def _setup(c: int, h: int, w: int, mean=None, std=None, **kw) -> DataSetup:
    return DataSetup(path="-", image_key="x", label_key="y", layout="channels_first", channels=list(range(c)),
                     in_chans=c, img_size=(h, w), task="classification", num_classes=2, train=[], val=[], test=[],
                     mean=mean, std=std, **kw)


def _jets(n: int, c: int, h: int, w: int, occupancy: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Raw detector-like images: a few exponential hits near the centre, zero elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, c, h, w)
    hits = torch.rand(n, c, h, w, generator=g) < occupancy
    centre = torch.zeros(h, w, dtype=torch.bool)
    centre[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    hits &= centre
    return torch.where(hits, torch.empty(n, c, h, w).exponential_(generator=g), x)


# --------------------------------------------------------------------------- one training step each
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("family,params", OPTIONS, ids=lambda v: str(v) if isinstance(v, str) else
                         "-".join(f"{k}={v}" for k, v in v.items() if k not in TINY_MAXX or k == "depths"))
def test_every_new_option_and_family_trains_a_step(family, params, shape):
    c, h, w = SHAPES[shape]
    torch.manual_seed(0)
    model = build_model(family, _params(family, params), _setup(c, h, w))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = _jets(2, c, h, w, occupancy=0.05)
    out = model(x)
    assert out.shape == (2, 2)
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1]))
    loss.backward()
    for name, q in model.named_parameters():
        if family == "mae" and name.startswith("decoder."):
            continue  # the decoder learns only in pretraining
        assert q.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(q.grad).all(), name
    opt.step()
    assert all(torch.isfinite(q).all() for q in model.parameters())
    if family == "mae":
        model(x, pretrain=True).backward()


# --------------------------------------------------------------------------- defaults are today's models
def _old_vit(img: int, chans: int, p: BaseModel, **kw) -> torch.nn.Module:
    """The vit model as it was built before issue 16: FitToPatches + timm's plain VisionTransformer."""
    fit = FitToPatches((img, img), p.patch_size, "pad")
    return torch.nn.Sequential(fit, VisionTransformer(
        img_size=fit.out_size, patch_size=p.patch_size, in_chans=chans, num_classes=2, global_pool=p.pool,
        class_token=p.pool == "token", embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
        mlp_ratio=p.mlp_ratio, **kw))


def test_default_vit_is_todays_model_and_old_checkpoints_load(tmp_path):
    from e2e_search.export.onnx import load_trained

    fam = get_family("vit")
    p = fam.params()
    torch.manual_seed(0)
    old = _old_vit(125, 3, p).eval()
    new = fam.build(p, in_chans=3, img_size=(125, 125), num_outputs=2).eval()
    assert [(k, v.shape) for k, v in old.state_dict().items()] == [(k, v.shape) for k, v in new.state_dict().items()]
    # a checkpoint written by the old model loads (strictly) into the model rebuilt from its params
    setup = _setup(3, 125, 125)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": old.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1, "family": "vit",
                "params": {}, "data": {k: v for k, v in setup.to_dict().items() if k not in ("train", "val", "test")},
                "metrics": {}}, path)
    t = load_trained(path, "old")
    x = torch.randn(2, 3, 125, 125)
    with torch.no_grad():
        torch.testing.assert_close(t.model(x), old(x), atol=0, rtol=0)


def test_default_hybrid_cait_and_mae_keep_their_state_dicts():
    hyb = get_family("hybrid_vit").build(get_family("hybrid_vit").params(), in_chans=3, img_size=(32, 32),
                                         num_outputs=2)
    vit = hyb[1]
    assert type(vit) is Vit and vit.pos_embed is not None and vit.pos_embed.requires_grad
    assert not any(k.endswith(("gamma", "q_norm.weight", "fc1_g.weight", "reg_token")) for k in hyb.state_dict())
    cp = get_family("cait").params()
    cait = get_family("cait").build(cp, in_chans=3, img_size=(125, 125), num_outputs=2)
    ref = Cait(img_size=(125, 125), patch_size=5, in_chans=3, num_classes=2, embed_dim=64, depth=2,
               depth_token_only=2, num_heads=4, init_values=0.1)
    assert [(k, v.shape) for k, v in cait[1].state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    mae = get_family("mae").build(get_family("mae").params(), in_chans=3, img_size=(125, 125), num_outputs=2)
    blk = Block(64, 4, 4.0, qkv_bias=True, norm_layer=torch.nn.LayerNorm)
    assert [(k, v.shape) for k, v in mae.encoder.blocks[0].state_dict().items()] == \
        [(k, v.shape) for k, v in blk.state_dict().items()]


@pytest.mark.parametrize("change,keys", [
    ({"reg_tokens": 3}, {"reg_token"}), ({"qk_norm": True}, {"q_norm.weight", "k_norm.weight"}),
    ({"layer_scale": 1e-5}, {"ls1.gamma", "ls2.gamma"}), ({"mlp": "swiglu"}, {"fc1_g.weight", "fc1_x.weight"}),
])
def test_each_technique_adds_what_it_names(change, keys):
    fam = get_family("vit")
    sd = fam.build(fam.params(**TINY, **change), in_chans=2, img_size=(32, 32), num_outputs=2).state_dict()
    assert all(any(k.endswith(key) for k in sd) for key in keys)


def test_swiglu_keeps_the_parameter_count_and_sincos_rope_none_are_not_learned():
    fam = get_family("vit")

    def n(**kw):
        return sum(q.numel() for q in fam.build(fam.params(**kw), in_chans=3, img_size=(125, 125),
                                                num_outputs=2).parameters())

    assert abs(n(mlp="swiglu") - n()) / n() < 0.01
    table = (25 * 25 + 1) * 64
    assert n(pos_embed="sincos") == n(pos_embed="rope") == n(pos_embed="none") == n() - table
    vit = fam.build(fam.params(pos_embed="sincos"), in_chans=3, img_size=(125, 125), num_outputs=2)[1]
    assert "1.pos_embed" not in fam.build(fam.params(pos_embed="sincos"), in_chans=3, img_size=(125, 125),
                                          num_outputs=2).state_dict()
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros(64))  # the class token gets no position


# --------------------------------------------------------------------------- rotary positions
def test_rope_rotates_patches_only_and_scores_depend_on_offsets():
    from trainables.layers.vit_blocks import apply_rope, rope_2d

    table = rope_2d(8, (4, 4))                                              # (16, 16)
    assert table.shape == (16, 16)
    q = torch.randn(1, 1, 16, 8)
    k = torch.randn(1, 1, 16, 8)
    # the same q at (r, c) and k at (r + 1, c + 2): the score depends on the offset only
    qq = q[:, :, :1].expand(1, 1, 16, 8)
    kk = k[:, :, :1].expand(1, 1, 16, 8)
    rq, rk = apply_rope(qq, table[None, None]), apply_rope(kk, table[None, None])
    s1 = (rq[0, 0, 0 * 4 + 0] * rk[0, 0, 1 * 4 + 2]).sum()
    s2 = (rq[0, 0, 2 * 4 + 1] * rk[0, 0, 3 * 4 + 3]).sum()
    torch.testing.assert_close(s1, s2)
    # prefix tokens (before the M patches) are left alone; odd head widths keep their last dims
    t = torch.randn(2, 3, 1 + 16, 8)
    assert torch.equal(apply_rope(t, table[None, None])[:, :, :1], t[:, :, :1])
    odd = rope_2d(6, (4, 4))
    t6 = torch.randn(1, 1, 16, 6)
    assert torch.equal(apply_rope(t6, odd[None, None])[..., 4:], t6[..., 4:])


def test_rope_with_kept_tokens_is_invariant_to_moving_the_jet_by_a_patch():
    """Rotary attention only sees offsets; with empty patches dropped and mean pooling, a jet moved by a whole
    patch is the same set of tokens at the same offsets. A learned table sees the move."""
    fam = get_family("vit")
    x = torch.zeros(1, 3, 40, 40)
    x[..., 10:20, 10:25] = _jets(1, 3, 10, 15, occupancy=0.5, seed=3)
    moved = torch.roll(x, shifts=(5, 10), dims=(-2, -1))
    outs = {}
    for pos in ("rope", "learned"):
        torch.manual_seed(0)
        m = fam.build(fam.params(**TINY, patch_size=5, pos_embed=pos, token_keep="nonempty", pool="avg"),
                      in_chans=3, img_size=(40, 40), num_outputs=2).eval()
        with torch.no_grad():
            outs[pos] = (m(x), m(moved))
    torch.testing.assert_close(*outs["rope"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(*outs["learned"], atol=1e-4)


# --------------------------------------------------------------------------- token_keep: nonempty
KEEP_CONFIGS = [
    {}, {"pool": "avg"}, {"pool": "map"}, {"pos_embed": "rope", "reg_tokens": 2},
    {"pos_embed": "sincos", "attention": "window", "window_size": 2}, {"attention": "linear", "pool": "avg"},
]


@pytest.mark.parametrize("params", KEEP_CONFIGS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "default")
def test_a_jets_output_does_not_depend_on_the_padding_its_batch_needs(params):
    fam = get_family("vit")
    torch.manual_seed(0)
    model = fam.build(fam.params(**TINY, patch_size=5, token_keep="nonempty", **params), in_chans=3,
                      img_size=(125, 125), num_outputs=2).eval()
    small = torch.zeros(1, 3, 125, 125)
    small[..., 60:64, 58:66] = 1.0 + torch.rand(1, 3, 4, 8)                 # 2-4 patches
    full = _jets(1, 3, 125, 125, occupancy=0.3, seed=1)                      # ~ a quarter of the grid
    with torch.no_grad():
        alone = model(small)
        together = model(torch.cat([full, small]))[1:]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", KEEP_CONFIGS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "default")
def test_with_every_patch_hit_nonempty_is_the_dense_model(params):
    fam = get_family("vit")
    torch.manual_seed(0)
    dense = fam.build(fam.params(**TINY, patch_size=4, **params), in_chans=2, img_size=(22, 21), num_outputs=2).eval()
    kept = fam.build(fam.params(**TINY, patch_size=4, token_keep="nonempty", **params), in_chans=2,
                     img_size=(22, 21), num_outputs=2).eval()
    kept.load_state_dict(dense.state_dict())                                # strict: the same parameters
    x = torch.rand(3, 2, 22, 21) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(kept(x), dense(x), atol=1e-5, rtol=1e-5)


def _first_block_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    h = model[1].blocks[0].register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def test_empty_patches_are_dropped_with_normalized_data_and_padding():
    """After per-channel normalization an empty cell is -mean/std, not 0; FitToPatches' zero padding is not a
    hit either. Only patches holding a raw hit become tokens: as many as the fullest jet of the batch."""
    mean, std = [0.3, 0.05], [1.5, 0.2]
    setup = _setup(2, 30, 30, mean=mean, std=std, log1p=True)
    assert empty_pixel(setup) == pytest.approx([-0.2, -0.25])
    model = build_model("vit", {**TINY, "patch_size": 8, "token_keep": "nonempty", "reg_tokens": 1}, setup).eval()
    raw = torch.zeros(3, 2, 30, 30)
    raw[0, 0, 1, 1] = 5.0                                                    # top-left patch (padded one)
    raw[0, 1, 20:22, 20:22] = 1.0                                            # another patch
    raw[1, 1, 29, 0] = 2.0                                                   # bottom-left patch only
    # raw[2]: no hit at all
    x = torch.from_numpy(preprocess(raw.numpy(), setup, select=False))
    assert (x[2] != 0).all()                                                 # empty cells are not zero
    tokens = _first_block_input(model, x)                                    # (B, 2 prefix + K, D)
    assert tokens.shape[1] == 2 + 2                                          # K = the 2 patches of jet 0
    keep: NonEmptyPatches = model[1].keep
    fitted = model[0](x)
    _, index, valid = keep(fitted)
    grid = 4                                                                 # 30 -> 32 padded, 4 x 4 patches
    assert index.shape == (3, 2) and valid.tolist() == [[True, True], [True, False], [True, False]]
    # (the image is padded by 1 pixel before: pixel (1, 1) lies in patch (0, 0), (20, 20) in patch (2, 2))
    assert index[0].tolist() == [0, 2 * grid + 2] and index[1, 0].item() == 3 * grid + 0
    assert index[2, 0].item() == 0                                           # no hit: its first patch, alone
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_the_exporting_path_keeps_every_patch_with_the_same_mask():
    keep = NonEmptyPatches(2, 1, torch.ones(4, 4, dtype=torch.bool), [0.0])
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 3, 3] = 1.0
    patches, index, valid = keep(x)
    assert patches.shape == (2, 1, 4) and index.tolist() == [[3], [0]] and valid.tolist() == [[True], [True]]
    traced = torch.jit.trace(lambda t: keep(t)[2], x, check_trace=False)
    assert traced(x).tolist() == [[False, False, False, True], [True, False, False, False]]


# --------------------------------------------------------------------------- export and rollout
EXPORT_CASES = {
    "coatnet": ("coatnet", {"embed_dim": 16, "dim_head": 8, "stem_width": 8, "depths": [1, 1, 1]}),
    "maxvit": ("maxvit", {"embed_dim": 16, "dim_head": 8, "stem_width": 8, "depths": [1, 1]}),
    "vit_nonempty": ("vit", {**TINY, "patch_size": 4, "token_keep": "nonempty", "pos_embed": "rope",
                             "reg_tokens": 1}),
    "vit_nonempty_window": ("vit", {**TINY, "patch_size": 4, "token_keep": "nonempty", "attention": "window",
                                    "window_size": 3, "pool": "avg", "mlp": "swiglu"}),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_to_onnx_with_runtime_parity(tmp_path, capsys, case):
    family, params = EXPORT_CASES[case]
    ckpt, model = make_checkpoint(tmp_path / "trial", family, params, IMAGE)
    out = tmp_path / f"{case}.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out, "--runs", "0")
    assert code == 0, stderr
    assert "parity" in stdout
    check_onnx(out, model, IMAGE, family)
    if params.get("token_keep") == "nonempty":  # detector-like inputs (empty cells at -mean/std): tokens dropped
        setup = DataSetup(**IMAGE, train=[], val=[], test=[])
        x = preprocess(_jets(9, 2, 32, 32, occupancy=0.03, seed=5).numpy(), setup, select=False)
        _, _, valid = model[1].keep(model[0](torch.from_numpy(x)))
        assert valid.shape[1] < 64                                           # fewer tokens than the 8 x 8 grid
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.abs(sess.run(["output"], {"image": x})[0] - ref).max() <= 1e-4


@pytest.mark.parametrize("params", [{}, {"pool": "avg", "pos_embed": "rope"}, {"attention": "window", "window_size": 2}])
def test_rollout_of_kept_tokens_is_zero_on_empty_patches(params):
    fam = get_family("vit")
    torch.manual_seed(0)
    model = fam.build(fam.params(**TINY, patch_size=5, token_keep="nonempty", **params), in_chans=3,
                      img_size=(40, 38), num_outputs=2)
    x = torch.zeros(2, 3, 40, 38)
    x[0, :, 12:18, 10:20] = 1.0
    x[1, 1, 30, 30] = 3.0
    maps = attention_rollout(model, x)
    assert maps.shape == (2, 40, 38)
    fit = model[0]
    hit = (fit(x).abs() > 0).any(1).float()                                  # (B, 40, 40) padded
    per_patch = torch.nn.functional.max_pool2d(hit[:, None], 5)[:, 0] > 0   # (B, 8, 8)
    px = per_patch.repeat_interleave(5, 1).repeat_interleave(5, 2)
    left, _, top, _ = fit.pad
    px = px[:, top:top + 40, left:left + 38]
    assert (maps[px] > 0).all() and (maps[~px] == 0).all()
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(2))


def test_rollout_of_kept_tokens_equals_the_dense_rollout_when_every_patch_is_hit():
    fam = get_family("vit")
    torch.manual_seed(0)
    dense = fam.build(fam.params(**TINY, patch_size=4, pos_embed="rope"), in_chans=2, img_size=(20, 20),
                      num_outputs=2)
    kept = fam.build(fam.params(**TINY, patch_size=4, pos_embed="rope", token_keep="nonempty"), in_chans=2,
                     img_size=(20, 20), num_outputs=2)
    kept.load_state_dict(dense.state_dict())
    x = torch.rand(2, 2, 20, 20) + 0.5
    torch.testing.assert_close(attention_rollout(kept, x), attention_rollout(dense, x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- coatnet and maxvit geometry
@pytest.mark.parametrize("size", [7, 32, 33, 125])
@pytest.mark.parametrize("stem,stages,window", [(2, 4, 4), (1, 2, 7), (2, 3, 5), (1, 1, 1)])
def test_maxxvit_padding_fits_every_stage(size, stem, stages, window):
    c = coatnet_size(size, stem, stages)
    assert c >= size and c % (stem * 2**stages) == 0 and c - size < stem * 2**stages
    m, windows = maxvit_size(size, stem, stages, window)
    assert m >= size and len(windows) == stages
    for i, w in enumerate(windows):
        feat = m // stem // 2 ** (i + 1)
        assert feat % w == 0 and (w == feat <= window or math.ceil(window / 2) <= w <= window)


@pytest.mark.parametrize("family,params", [("coatnet", {"depths": [1, 1, 2]}), ("maxvit", {"window_size": 3})])
def test_maxxvit_builds_exact_stages_for_125_pixel_images(family, params):
    fam = get_family(family)
    model = fam.build(fam.params(**{**TINY_MAXX, **params}), in_chans=3, img_size=(125, 125), num_outputs=2)
    assert all(s >= 125 for s in model.fit.out_size)
    feat = model.stem(model.fit(torch.zeros(2, 3, 125, 125)))
    for i, stage in enumerate(model.stages):
        assert feat.shape[-1] % 2 == 0
        feat = stage(feat)
        if family == "maxvit":
            w = model.windows[i]
            assert feat.shape[-2] % w[0] == 0 and feat.shape[-1] % w[1] == 0
    assert tuple(feat.shape[-2:]) == tuple(model.feat_size)


def test_coatnet_conv_stages_leave_the_last_stage_attending():
    assert coatnet_blocks(CoatnetParams()) == ["C", "C", "T", "T"]
    assert coatnet_blocks(CoatnetParams(depths=[1, 1], conv_stages=3)) == ["C", "T"]
    assert coatnet_blocks(CoatnetParams(depths=[2], conv_stages=2)) == ["T"]
    assert coatnet_blocks(CoatnetParams(conv_stages=0)) == ["T"] * 4


def test_a_family_declaring_empty_pixel_must_take_it():
    class P(BaseModel):
        x: int = 1

    with pytest.raises(RuntimeError, match="empty_pixel"):
        @register_family("_no_empty_pixel", params=P, capabilities=Capabilities(empty_pixel=True))
        def build(p, *, in_chans, img_size, num_outputs):
            return None
