"""Attention rollout (trainables/attention/rollout.py): the recorded weights are the ones the layers apply,
the rollout algebra, the pixel mapping through FitToPatches, and the plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.layers import Attention

from e2e_search.record.figures import attention_plot
from trainables.attention.rollout import (
    _class_probs,
    _talking_probs,
    _timm_probs,
    attention_rollout,
    pick_examples,
    save_attention,
)
from trainables.registry import get_family


def _build(family: str, size=(20, 20), chans: int = 3, **kw) -> torch.nn.Module:
    f = get_family(family)
    torch.manual_seed(0)
    return f.build(f.params(**kw), in_chans=chans, img_size=size, num_outputs=2).eval()


@pytest.mark.parametrize("attention", ["softmax", "linear", "window"])
def test_recorded_weights_are_what_the_layer_applies(attention):
    """With one head, proj(A @ v) must reproduce the attention module's own output."""
    model = _build("vit", patch_size=4, depth=1, embed_dim=16, num_heads=1, attention=attention, window_size=2)
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    x = torch.randn(2, 1 + 25, 16)
    A = _timm_probs(attn, x, None)                                       # (B, N, N)
    assert torch.allclose(A.sum(-1), torch.ones(2, 26), atol=1e-5)
    v = attn.qkv(x).reshape(2, 26, 3, 16)[:, :, 2]                        # (B, N, D), one head
    assert torch.allclose(attn.proj(attn.norm(A @ v)), attn(x), atol=1e-5)
    if attention == "window":  # patches outside a patch's window get exactly zero weight
        assert (A[:, 1:, 1:][:, ~attn.window_mask[1:, 1:]] == 0).all()


def test_rollout_of_one_layer_is_the_class_row_of_half_attention_plus_identity():
    model = _build("vit", size=(20, 20), patch_size=4, depth=1, embed_dim=16, num_heads=2)
    x = torch.rand(3, 3, 20, 20)
    vit = model[1]
    attn = vit.blocks[0].attn
    captured = {}
    h = attn.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
    maps = attention_rollout(model, x)
    h.remove()
    A = _timm_probs(attn, captured["x"], None)                           # (B, 26, 26)
    R = 0.5 * A + 0.5 * torch.eye(26)
    want = R[:, 0, 1:].reshape(3, 5, 5)
    want = want / want.flatten(1).amax(1)[:, None, None]
    want = want.repeat_interleave(4, 1).repeat_interleave(4, 2)           # each token over its 4x4 pixels
    assert maps.shape == (3, 20, 20)
    assert torch.allclose(maps, want, atol=1e-5)


def test_two_layers_chain_and_pooling_without_class_token():
    model = _build("vit", size=(20, 20), patch_size=4, depth=2, embed_dim=16, num_heads=2, pool="avg")
    xs = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: xs.append(a[0])) for b in model[1].blocks]
    maps = attention_rollout(model, torch.rand(2, 3, 20, 20))
    for h in hooks:
        h.remove()
    eye = torch.eye(25)
    R = eye
    for blk, x in zip(model[1].blocks, xs):
        R = (0.5 * _timm_probs(blk.attn, x, None) + 0.5 * eye) @ R
    want = R.mean(1).reshape(2, 5, 5)                                     # no class token: mean patch row
    want = (want / want.flatten(1).amax(1)[:, None, None]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.allclose(maps, want, atol=1e-5)


def test_padding_and_cropping_map_back_to_the_input_pixels():
    x = torch.rand(2, 2, 22, 21)
    padded = attention_rollout(_build("vit", size=(22, 21), chans=2, patch_size=4, depth=1, embed_dim=16), x)
    assert padded.shape == (2, 22, 21) and (padded > 0).all()             # every pixel lies in some patch
    cropped = attention_rollout(_build("vit", size=(22, 21), chans=2, patch_size=4, depth=1, embed_dim=16,
                                       patch_fit="crop"), x)
    assert cropped.shape == (2, 22, 21)
    # crop keeps the central 20x20: the outer ring the model never saw gets zero
    assert (cropped[:, :1] == 0).all() and (cropped[:, -1:] == 0).all() and (cropped[:, 1:21, :20] > 0).all()


@pytest.mark.parametrize("family,kw", [
    ("hybrid_vit", {"stem_stride": 2, "patch_size": 2, "depth": 1, "embed_dim": 16}),
    ("mae", {"patch_size": 4, "depth": 2, "embed_dim": 16, "decoder_dim": 16}),
    ("mae", {"patch_size": 4, "depth": 1, "embed_dim": 16, "decoder_dim": 16, "pool": "avg"}),
    ("cait", {"patch_size": 4, "depth": 1, "class_attn_layers": 2, "embed_dim": 16}),
])
def test_other_transformer_families_have_maps(family, kw):
    model = _build(family, size=(19, 20), **kw)
    maps = attention_rollout(model, torch.rand(3, 3, 19, 20))
    assert maps.shape == (3, 19, 20) and torch.isfinite(maps).all()
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(3))
    assert model.training is False  # the model's mode is left as it was


def test_cait_weights_are_distributions():
    model = _build("cait", patch_size=4, depth=1, class_attn_layers=1, embed_dim=16, num_heads=2)
    cait = model[1]
    x = torch.randn(2, 25, 16)
    a = _talking_probs(cait.blocks[0].attn, x)
    assert a.shape == (2, 25, 25) and torch.allclose(a.sum(-1), torch.ones(2, 25), atol=1e-5) and (a >= 0).all()
    c = _class_probs(cait.blocks_token_only[0].attn, torch.randn(2, 26, 16))
    assert c.shape == (2, 26) and torch.allclose(c.sum(-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("family", ["swin", "resnet15"])
def test_families_without_a_global_token_have_no_map(family, tmp_path):
    kw = {"width": 8, "blocks": 5} if family == "resnet15" else {}
    model = _build(family, size=(32, 32), **kw)
    assert attention_rollout(model, torch.rand(1, 3, 32, 32)) is None
    assert save_attention(str(tmp_path / "a.npz"), model, torch.rand(1, 3, 32, 32), ["x"]) is False
    assert not (tmp_path / "a.npz").exists()


def test_training_mode_is_restored():
    model = _build("vit", patch_size=4, depth=1, embed_dim=16).train()
    attention_rollout(model, torch.rand(1, 3, 20, 20))
    assert model.training


def test_pick_examples_takes_classes_in_turn():
    assert pick_examples([0, 0, 0, 1, 0, 1], 6, k=4) == [0, 3, 1, 5]
    assert pick_examples([2, 2, 2], 3, k=4) == [0, 1, 2]
    assert pick_examples(None, 10, k=4) == [0, 1, 2, 3]
    assert pick_examples(None, 2, k=4) == [0, 1]


def test_saved_maps_plot(tmp_path):
    model = _build("vit", patch_size=4, depth=1, embed_dim=16)
    assert save_attention(str(tmp_path / "attention.npz"), model, torch.rand(3, 3, 20, 20), ["class 0", "class 1", "c"])
    z = np.load(tmp_path / "attention.npz")
    assert z["images"].shape == (3, 3, 20, 20) and z["maps"].shape == (3, 20, 20)
    png = attention_plot(tmp_path / "attention.npz", tmp_path / "attention_rollout.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
