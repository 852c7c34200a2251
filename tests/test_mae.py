"""Family ``mae``: shapes, masking rule, loss, pretraining, linear probe, encoder transfer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.families.mae import MaeParams, build_mae, patchify, random_masking, unpatchify
from trainables.registry import get_family

SMALL = dict(patch_size=5, embed_dim=16, depth=1, num_heads=2, decoder_dim=8, decoder_heads=2)


def sparse_images(b: int, c: int, size: int, hot: int, seed: int = 0, background: float = -0.3) -> torch.Tensor:
    """Normalized-looking detector images: a constant background plus ``hot`` random hot pixels each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((b, c, size, size), background)
    for i in range(b):
        idx = torch.randperm(size * size, generator=g)[:hot]
        x[i][:, idx // size, idx % size] = 3.0 + torch.rand(c, hot, generator=g)
    return x


@pytest.mark.parametrize("shape", [(3, 125, 125), (2, 32, 32), (8, 125, 125)],
                         ids=["125x125x3", "32x32x2", "125x125x8"])
@pytest.mark.parametrize("tasks", [{"classification": 2}, {"classification": 3}, {"regression": 1},
                                   {"classification": 2, "regression": 1}], ids=["c2", "c3", "r1", "c2r1"])
def test_trains_a_step_in_both_modes(shape, tasks):
    fam = get_family("mae")
    assert fam.inputs == "image" and fam.description
    n_out = sum(tasks.values())
    model = fam.build(fam.params(**{**SMALL, "patch_size": 25 if shape[1] == 125 else 5}), in_chans=shape[0],
                      img_size=shape[1:], num_outputs=n_out, tasks=tasks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = sparse_images(4, shape[0], shape[1], hot=40)
    for pretrain in (True, False):
        opt.zero_grad()
        out = model(x, pretrain=pretrain)
        if pretrain:
            assert out.dim() == 0
            loss = out
        else:
            assert out.shape == (4, n_out)
            loss = out.pow(2).mean()
            if "classification" in tasks:
                loss = loss + F.cross_entropy(out[:, : tasks["classification"]], torch.tensor([0, 1, 0, 1]))
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("c", [1, 2, 3, 8])
@pytest.mark.parametrize("hw,p", [((10, 15), 5), ((12, 8), 4), ((7, 7), 7)])
def test_patchify_round_trip(c, hw, p):
    x = torch.randn(2, c, *hw)
    t = patchify(x, p)
    grid = (hw[0] // p, hw[1] // p)
    assert t.shape == (2, grid[0] * grid[1], p * p * c)
    assert torch.equal(unpatchify(t, p, grid), x)
    # patch (i, j) holds exactly the pixels of that image block, channel values of a pixel adjacent
    i, j = grid[0] - 1, grid[1] - 1
    block = x[1, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(t[1, i * grid[1] + j], block)


def test_non_multiple_sizes_are_zero_padded():
    m = build_mae(MaeParams(**{**SMALL, "patch_size": 10}), in_chans=3, img_size=(32, 27), num_outputs=2)
    x = torch.randn(2, 3, 32, 27)
    assert m.grid == (4, 3)
    img = m.unpatchify(m.patchify(x))                                   # (2, 3, 40, 30)
    assert img.shape == (2, 3, 40, 30)
    assert img.abs().sum() == pytest.approx(x.abs().sum())              # only zeros added
    assert m(x).shape == (2, 2) and torch.isfinite(m(x, pretrain=True))


def test_masking_rule_counts():
    torch.manual_seed(0)
    nonempty = torch.zeros(5, 50, dtype=torch.bool)
    for b, n in enumerate([0, 1, 10, 50, 49]):
        nonempty[b, torch.randperm(50)[:n]] = True
    m = random_masking(nonempty, 0.75)
    k = [0, 1, 8, 38, 37]                                               # ceil(0.75 n)
    K = max(k)
    assert m.target.sum(1).tolist() == k
    assert m.hidden.sum(1).tolist() == [K] * 5 and m.ids_keep.shape == (5, 50 - K)
    assert not (m.target & ~nonempty).any()                             # targets are non-empty patches
    assert torch.equal(m.target, m.hidden & nonempty)                   # visible non-empty never hidden
    kept = torch.zeros_like(m.hidden).scatter(1, m.ids_keep, True)
    assert torch.equal(kept, ~m.hidden)
    # plain MAE when every patch counts as non-empty
    m = random_masking(torch.ones(3, 20, dtype=torch.bool), 0.75)
    assert m.target.sum(1).tolist() == [15] * 3 and torch.equal(m.target, m.hidden)


def test_mask_nonempty_never_masks_an_empty_patch():
    # 32x32 with patch 5 -> padded to 35x35: border patches mix background and zero padding, still empty
    m = build_mae(MaeParams(**SMALL), in_chans=2, img_size=(32, 32), num_outputs=2)
    x = sparse_images(3, 2, 32, hot=4, seed=1)
    x[2] = -0.3                                                         # one all-empty image
    nonempty = m.nonempty_patches(x)                                    # (3, 49)
    hot = m.patchify(x).view(3, 49, 25, 2).amax(dim=(2, 3)) > 1.0       # patches holding a hot pixel
    assert torch.equal(nonempty, hot)
    assert nonempty[:2].any(1).all() and not nonempty[2].any()
    for seed in range(5):
        torch.manual_seed(seed)
        mk = m.random_masking(nonempty)
        assert not (mk.target & ~hot).any() and mk.target.any()
        assert mk.target[2].sum() == 0


def test_all_empty_batch_gives_finite_zero_loss_with_grad():
    m = build_mae(MaeParams(**SMALL), in_chans=3, img_size=(20, 20), num_outputs=1)
    x = torch.full((2, 3, 20, 20), -0.5)
    loss = m(x, pretrain=True)
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_only_sees_masked_patches(norm_pix):
    m = build_mae(MaeParams(**SMALL, norm_pix_loss=norm_pix), in_chans=2, img_size=(20, 20), num_outputs=2)
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 50, requires_grad=True)
    pred = torch.randn(2, 16, 50)
    target = torch.zeros(2, 16, dtype=torch.bool)
    target[0, [1, 5]] = True
    target[1, 7] = True
    loss = m.forward_loss(patches, pred, target)
    loss.backward()
    touched = patches.grad.abs().sum(-1) > 0
    assert torch.equal(touched, target)
    per_patch = ((pred - patches.detach()) ** 2).mean(-1) if not norm_pix else None
    if per_patch is not None:
        assert loss.item() == pytest.approx(per_patch[target].mean().item(), rel=1e-5)


def test_pretraining_loss_decreases():
    """Non-empty patches all hold the same shower shape: reconstructing them is learnable."""
    torch.manual_seed(0)
    m = build_mae(MaeParams(**SMALL), in_chans=2, img_size=(20, 20), num_outputs=2)
    g = torch.Generator().manual_seed(2)
    template = 1.0 + 3.0 * torch.rand(2 * 25, generator=g)             # one (p*p*C,) pattern
    patches = torch.full((4, 16, 50), -0.3)                             # background
    for b in range(4):
        patches[b, torch.randperm(16, generator=g)[:6]] = template
    x = m.unpatchify(patches)                                           # (4, 2, 20, 20)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = m(x, pretrain=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.25 * sum(losses[:5]), losses


def test_linear_probe_only_trains_the_head():
    m = build_mae(MaeParams(**SMALL, finetune="linear"), in_chans=3, img_size=(20, 20), num_outputs=2)
    out = m(torch.randn(4, 3, 20, 20))
    F.cross_entropy(out, torch.tensor([0, 1, 1, 0])).backward()
    for name, p in m.named_parameters():
        if name.startswith(("head.", "head_norm.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # full fine-tuning reaches the encoder
    full = build_mae(MaeParams(**SMALL), in_chans=3, img_size=(20, 20), num_outputs=2)
    full(torch.randn(4, 3, 20, 20)).sum().backward()
    assert full.encoder.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_finetune_model_loads_pretrained_encoder(pool):
    torch.manual_seed(0)
    pre = build_mae(MaeParams(**SMALL, pool=pool), in_chans=3, img_size=(20, 20), num_outputs=2)
    opt = torch.optim.Adam(pre.parameters(), lr=1e-2)
    x = sparse_images(2, 3, 20, hot=20)
    pre(x, pretrain=True).backward()
    opt.step()
    torch.manual_seed(1)
    ft = build_mae(MaeParams(**SMALL, pool=pool, finetune="linear"), in_chans=3, img_size=(20, 20), num_outputs=3)
    assert not torch.allclose(ft.forward_features(x), pre.forward_features(x))
    enc = {k: v for k, v in pre.state_dict().items() if k.startswith("encoder.")}
    assert {"encoder.patch_embed.weight", "encoder.cls_token", "encoder.norm.weight"} <= set(enc)
    missing, unexpected = ft.load_state_dict(enc, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("encoder.")]
    assert torch.equal(ft.forward_features(x), pre.forward_features(x))


def test_params_round_dims_and_validate():
    m = build_mae(MaeParams(embed_dim=30, num_heads=4, decoder_dim=10, decoder_heads=4, depth=1),
                  in_chans=1, img_size=(10, 10), num_outputs=1)
    assert m.encoder.cls_token.shape[-1] == 32 and m.decoder.mask_token.shape[-1] == 12
    assert m(torch.randn(2, 1, 10, 10)).shape == (2, 1)
    for bad in ({"mask_ratio": 0.0}, {"mask_ratio": 1.0}, {"pretrain_epochs": -1}, {"pool": "map"}):
        with pytest.raises(ValueError):
            MaeParams(**bad)
    assert MaeParams(lr=0.1, family="mae").pretrain_epochs == 2          # extra keys ignored
    assert math.isclose(MaeParams().mask_ratio, 0.75)
