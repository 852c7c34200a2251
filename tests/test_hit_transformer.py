"""Issue 26: the hit_transformer family (hits as tokens, ParT pair bias, class attention), the sparse cache's hit
lists, and its ONNX form. CPU, no Ray; tiny models."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.test_export import make_checkpoint, run_export
from trainables.attention.rollout import attention_rollout
from trainables.core.batches import SparseRows
from trainables.core.model import build_model, empty_pixel
from trainables.data.setup import DataSetup
from trainables.data.transforms import preprocess
from trainables.families.hit_transformer import hit_list, input_hits
from trainables.layers.pair_bias import pair_features
from trainables.registry import get_family

TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2, "class_attn_layers": 1}


def _setup(c: int, h: int, w: int, mean=None, std=None, task: str = "classification", **kw) -> DataSetup:
    return DataSetup(path="-", image_key="x", label_key="y", layout="channels_first", channels=list(range(c)),
                     in_chans=c, img_size=(h, w), task=task, num_classes=2, train=[], val=[], test=[],
                     mean=mean, std=std, **kw)


def _raw(n: int, c: int, h: int, w: int, occupancy: float = 0.03, seed: int = 0) -> np.ndarray:
    """Raw detector-like images: distinct exponential energies at random pixels, zero elsewhere."""
    rng = np.random.default_rng(seed)
    hit = rng.random((n, c, h, w)) < occupancy
    return np.where(hit, rng.exponential(5.0, (n, c, h, w)) + 0.01, 0.0).astype(np.float32)


def _csr(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse cache's CSR arrays of raw images (offsets, flat index, values), as sparse_ingest stores them."""
    flat = raw.reshape(len(raw), -1)
    idx = [np.flatnonzero(r) for r in flat]
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in idx])]).astype(np.int64)
    index = np.concatenate(idx).astype(np.int32)
    values = np.concatenate([r[i] for r, i in zip(flat, idx)]).astype(np.float32)
    return offsets, index, values


MEAN, STD = [0.02, 0.05, 0.01], [0.5, 1.5, 0.3]


@pytest.mark.parametrize("params", [{}, {"merge": 5}, {"merge": 4, "pool": "mean"}, {"pair_features": False},
                                    {"max_hits": 7}], ids=str)
def test_sparse_hit_lists_give_the_dense_images_outputs(params):
    """The sparse cache's hit lists (never dense) and the normalized dense images give the same outputs, flips
    included: the cache path is the model the export and the maps see."""
    c, h, w = 3, 30, 26
    raw = _raw(6, c, h, w)
    setup = _setup(c, h, w, MEAN, STD)
    torch.manual_seed(0)
    model = build_model("hit_transformer", {**TINY, **params}, setup).eval()
    rows = SparseRows(*_csr(raw), (c, h, w), 0.0, "cpu", MEAN, STD)
    pos = torch.arange(6)
    fh, fw = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool), torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.bool)
    hits, mask = rows.hits(pos, fh, fw)
    assert hits.shape[1] == int(mask.sum(1).max()) == max((raw[i] != 0).sum() for i in range(6))
    with torch.no_grad():
        dense = model(rows.dense(pos, fh, fw))
        sparse = model(hits, mask)
    assert torch.allclose(dense, sparse, atol=2e-5), (dense - sparse).abs().max()


def test_a_jets_output_does_not_depend_on_its_batch_nor_on_the_order_of_its_hits():
    c, h, w = 2, 20, 20
    raw = _raw(5, c, h, w, seed=3)
    torch.manual_seed(0)
    model = build_model("hit_transformer", TINY, _setup(c, h, w)).eval()
    hits, mask = (torch.from_numpy(a) for a in hit_list(raw, [0.0] * c, None, 200))
    with torch.no_grad():
        together = model(hits, mask)
        alone = torch.cat([model(hits[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())])
                           for i in range(5)])
        perm = torch.randperm(hits.shape[1])
        shuffled = model(hits[:, perm], mask[:, perm])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, shuffled, atol=1e-5)


def test_the_hit_cap_keeps_the_most_energetic_hits_and_merging_sums_towers():
    fam = get_family("hit_transformer")
    model = fam.build(fam.params(**TINY, max_hits=2), in_chans=1, img_size=(10, 10), num_outputs=2)
    x = torch.zeros(1, 1, 10, 10)
    x[0, 0, 1, 1], x[0, 0, 5, 5], x[0, 0, 8, 2], x[0, 0, 3, 7] = 1.0, 4.0, 3.0, 2.0
    ch, r, c, e, valid, total = model.hits_of(x)
    assert e.tolist() == [[4.0, 3.0]] and r.tolist() == [[5.0, 8.0]] and c.tolist() == [[5.0, 2.0]]
    assert valid.all() and total.item() == 10.0
    towers = fam.build(fam.params(**TINY, merge=5, max_hits=4), in_chans=1, img_size=(10, 10), num_outputs=2)
    x[0, 0, 0, 0] = 4.0  # same 5x5 tower as (1, 1): 5 GeV at the energy-weighted centroid (0.2, 0.2)
    ch, r, c, e, valid, total = towers.hits_of(x)
    got = sorted(zip(e[0].tolist(), r[0].tolist(), c[0].tolist(), valid[0].tolist()), reverse=True)
    assert [g[0] for g in got] == [5.0, 4.0, 3.0, 2.0] and all(g[3] for g in got)
    assert math.isclose(got[0][1], 0.2, abs_tol=1e-6) and math.isclose(got[0][2], 0.2, abs_tol=1e-6)


def test_pair_features_are_parts_for_two_massless_deposits():
    eta = torch.tensor([[0.0, 0.3]])
    phi = torch.tensor([[0.0, 0.4]])
    e = torch.tensor([[10.0, 30.0]])
    f = pair_features(eta, phi, e)[0, 0, 1]
    dr = math.hypot(0.3, 0.4)
    m2 = 2 * 10 * 30 * (math.cosh(0.3) - math.cos(0.4))
    want = [math.log(dr), math.log(10 * dr), math.log(10 / 40), math.log(m2)]
    assert torch.allclose(f, torch.tensor(want), atol=1e-5)
    assert torch.allclose(pair_features(eta, phi, e)[0, 1, 0], f)  # symmetric


@pytest.mark.parametrize("task", ["classification", "regression", "joint"])
@pytest.mark.parametrize("shape", [(2, 32, 32), (3, 125, 125), (8, 40, 40)], ids=str)
def test_every_task_and_shape_trains_a_step(task, shape):
    c, h, w = shape
    setup = _setup(c, h, w, task=task, target_key="m" if task != "classification" else None)
    torch.manual_seed(0)
    model = build_model("hit_transformer", {**TINY, "merge": 5 if h > 100 else 1}, setup)
    x = torch.from_numpy(_raw(2, c, h, w, occupancy=0.01))
    out = model(x)
    assert out.shape == (2, 2 if task == "classification" else 1 if task == "regression" else 3)
    out.float().pow(2).mean().backward()
    for name, q in model.named_parameters():
        assert q.grad is not None and torch.isfinite(q.grad).all(), name


def test_a_jet_without_hits_gives_a_finite_output():
    model = build_model("hit_transformer", TINY, _setup(2, 16, 16)).eval()
    out = model(torch.zeros(2, 2, 16, 16))
    assert torch.isfinite(out).all()


def test_merge_larger_than_the_image_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="merge 40 is larger than the image .*at most 32"):
        build_model("hit_transformer", {**TINY, "merge": 40}, _setup(2, 32, 32))


def test_attention_map_puts_the_class_tokens_attention_on_the_hits():
    c, h, w = 3, 24, 24
    raw = _raw(2, c, h, w, seed=1)
    model = build_model("hit_transformer", TINY, _setup(c, h, w))
    maps = attention_rollout(model, torch.from_numpy(raw))
    assert maps.shape == (2, h, w)
    hit_pixels = torch.from_numpy(raw != 0).any(1)
    assert (maps[~hit_pixels] == 0).all() and (maps[hit_pixels] > 0).any()
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(2))


IMAGE = {"path": "-", "image_key": "X_jets", "label_key": "y", "layout": "channels_last", "channels": [0, 1, 2],
         "in_chans": 3, "img_size": [40, 40], "task": "classification", "num_classes": 2, "mean": MEAN, "std": STD}


@pytest.mark.parametrize("params", [{}, {"merge": 5, "max_hits": 16}], ids=str)
def test_export_takes_a_hit_list_with_a_mask_and_matches_pytorch(tmp_path, capsys, params):
    ckpt, model = make_checkpoint(tmp_path / "trial", "hit_transformer", {**TINY, **params}, IMAGE)
    out = tmp_path / "hits.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out, "--runs", "2")
    assert code == 0, stderr
    assert "hits (batch" in stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["hits", "mask"]
    setup = DataSetup(**IMAGE, train=[], val=[], test=[])
    x = preprocess(_raw(5, 3, 40, 40, occupancy=0.02, seed=9), setup, select=False)
    hits, mask = hit_list(x, empty_pixel(setup), STD, input_hits(model))
    got = sess.run(["output"], {"hits": hits, "mask": mask})[0]
    with torch.inference_mode():
        dense = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - dense).max() <= 1e-4  # the ONNX hit-list form is the dense model
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["e2e.inputs"] == "hits,mask" and "hit_list" in meta["e2e.input_layout"]


# --------------------------------------------------------------------------- vit with the pair bias
VIT_PAIR = {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 4, "token_keep": "nonempty",
            "pair_bias": True}


@pytest.mark.parametrize("extra", [{}, {"pos_embed": "rope", "reg_tokens": 1, "pool": "avg"}], ids=str)
def test_vit_pair_bias_changes_the_output_trains_and_ignores_the_batch(extra):
    c, h, w = 3, 24, 24
    setup = _setup(c, h, w, MEAN, STD)
    x = torch.from_numpy(preprocess(_raw(3, c, h, w, occupancy=0.01, seed=4), setup, select=False))
    torch.manual_seed(0)
    with_bias = build_model("vit", {**VIT_PAIR, **extra}, setup)
    torch.manual_seed(0)
    without = build_model("vit", {**VIT_PAIR, **extra, "pair_bias": False}, setup)
    assert {k for k in with_bias.state_dict()} - {k for k in without.state_dict()} == \
        {k for k in with_bias.state_dict() if ".pair." in k}
    without.load_state_dict({k: v for k, v in with_bias.state_dict().items() if ".pair." not in k})
    with torch.no_grad():  # a bias of a few units per pair (at initialization it is close to 0)
        with_bias[1].pair.mlp[-1].weight.normal_(0, 3.0)
    with_bias.eval(), without.eval()
    with torch.no_grad():
        a, _ = with_bias(x), without(x)
        alone = torch.cat([with_bias(x[i : i + 1]) for i in range(3)])
        tokens = [m[1].features(m[0](x))[0] for m in (with_bias, without)]
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3                   # the bias reaches the tokens
    assert torch.allclose(a, alone, atol=1e-5)                          # padding of the batch changes nothing
    with_bias.train()
    with_bias(x).sum().backward()
    assert all(q.grad is not None for n, q in with_bias.named_parameters() if ".pair." in n)
    maps = attention_rollout(with_bias, x)
    assert maps is not None and maps.shape == (3, h, w)


@pytest.mark.parametrize("other", [{"token_keep": "all"}, {"attention": "linear"}, {"attention": "window"}], ids=str)
def test_vit_pair_bias_is_ignored_without_nonempty_softmax_attention(other):
    """As window_size without attention: window: the same model (state dict) as without pair_bias."""
    torch.manual_seed(0)
    with_bias = build_model("vit", {**VIT_PAIR, **other}, _setup(2, 16, 16))
    torch.manual_seed(0)
    without = build_model("vit", {**VIT_PAIR, **other, "pair_bias": False}, _setup(2, 16, 16))
    assert with_bias.state_dict().keys() == without.state_dict().keys()
    assert not any(".pair." in k for k in with_bias.state_dict())


def test_vit_pair_bias_exports_with_parity(tmp_path, capsys):
    data = {**IMAGE, "img_size": [20, 20]}
    ckpt, model = make_checkpoint(tmp_path / "trial", "vit", VIT_PAIR, data)
    code, stdout, stderr = run_export(capsys, ckpt, tmp_path / "vit.onnx", "--runs", "0")
    assert code == 0, stderr
    assert "parity" in stdout


def test_jet_features_give_the_invariant_mass_of_the_kept_hits():
    from trainables.families.hit_transformer import jet_features
    from trainables.layers.pair_bias import pair_features

    eta, phi = torch.tensor([[0.1, -0.2, 0.0]]), torch.tensor([[0.3, 0.1, 0.0]])
    e, ch = torch.tensor([[20.0, 50.0, 0.0]]), torch.tensor([[0, 1, 0]])  # the third: padding (E = 0)
    f = jet_features(eta, phi, e, ch, 2) * 4                                     # ln E, ln E_c..., ln m, ln m_c...
    m2_pair = pair_features(eta[:, :2], phi[:, :2], e[:, :2])[0, 0, 1, 3].exp()  # ParT's m² of the pair
    assert math.isclose(f[0, 0].exp().item(), 20 * math.cosh(0.1) + 50 * math.cosh(0.2), rel_tol=1e-5)
    assert math.isclose(f[0, 3].exp().item() ** 2, m2_pair.item(), rel_tol=1e-3)
    assert math.isclose(f[0, 1].exp().item(), 20 * math.cosh(0.1), rel_tol=1e-5)  # one hit per channel: m = 0
    assert f[0, 4].exp().item() < 1e-2
