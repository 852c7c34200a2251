"""Family ``event_transformer``: shapes, set invariances, task heads, masked-object pretraining, transfer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.families.event_transformer import EventTransformerParams, hidden_counts
from trainables.registry import get_family

torch.set_num_threads(1)

SHAPES = [(6, 4), (20, 7)]
TASKS = [{"classification": 2}, {"classification": 3}, {"regression": 1}, {"classification": 2, "regression": 1}]
SMALL = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
TRAINING_PARAMS = {"lr", "weight_decay", "batch_size", "warmup_epochs", "grad_clip", "loss", "loss_weight", "seed",
                   "family", "tasks", "pretrained"}


def build(n_objects: int = 6, n_features: int = 4, tasks: dict[str, int] | None = None, seed: int = 0, **params):
    torch.manual_seed(seed)
    fam = get_family("event_transformer")
    p = fam.params(**(SMALL | params))
    tasks = tasks or {"out": 2}
    return fam.build(p, n_objects=n_objects, n_features=n_features, num_outputs=sum(tasks.values()), tasks=tasks)


def batch(b: int = 4, n: int = 6, f: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Objects (b, n, f) with 1..n real objects per event (real first), padding zeroed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, f, generator=g)
    n_real = torch.randint(1, n + 1, (b,), generator=g)
    n_real[0] = n
    mask = torch.arange(n)[None, :] < n_real[:, None]                          # (b, n)
    return x * mask[..., None], mask


def task_loss(out: torch.Tensor, tasks: dict[str, int]) -> torch.Tensor:
    loss, col = out.new_zeros(()), 0
    for name, n in tasks.items():
        block = out[:, col : col + n]
        if name == "classification":
            loss = loss + F.cross_entropy(block, torch.arange(len(out)) % n)
        else:
            loss = loss + F.mse_loss(block.squeeze(-1), torch.linspace(-1, 1, len(out)))
        col += n
    return loss


# --------------------------------------------------------------------------- contract
def test_registered_and_params_are_searchable():
    fam = get_family("event_transformer")
    assert fam.inputs == "objects" and fam.description
    fields = set(EventTransformerParams.model_fields)
    assert not fields & TRAINING_PARAMS
    assert {"pretrain_epochs", "finetune", "mask_ratio", "task_queries", "head_mixing"} <= fields
    p = EventTransformerParams(unknown=1)                                       # extra ignored
    assert (p.embed_dim, p.depth, p.num_heads, p.pretrain_epochs, p.finetune) == (64, 3, 4, 2, "full")
    with pytest.raises(ValueError):
        EventTransformerParams(task_queries=0)
    with pytest.raises(ValueError):
        EventTransformerParams(finetune="frozen")


def test_embed_dim_rounded_up_to_heads():
    m = build(embed_dim=30, num_heads=4)
    assert m.encoder.embed[0].out_features == 32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks", TASKS, ids=lambda t: "+".join(f"{k}{v}" for k, v in t.items()))
def test_one_step_finite(shape, tasks):
    n, f = shape
    m = build(n, f, tasks)
    x, mask = batch(4, n, f)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    out = m(x, mask)
    assert out.shape == (4, sum(tasks.values()))
    loss = task_loss(out, tasks)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert m.encoder.embed[0].weight.grad.abs().sum() > 0
    opt.step()
    # and one pretraining step
    opt.zero_grad()
    ploss = m(x, mask, pretrain=True)
    assert ploss.dim() == 0 and torch.isfinite(ploss)
    ploss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.mask_token.grad.abs().sum() > 0


def test_tasks_none_means_single_block():
    fam = get_family("event_transformer")
    m = fam.build(fam.params(**SMALL), n_objects=6, n_features=4, num_outputs=3)
    x, mask = batch()
    assert m(x, mask).shape == (4, 3)
    with pytest.raises(ValueError):
        fam.build(fam.params(**SMALL), n_objects=6, n_features=4, num_outputs=3, tasks={"classification": 2})


# --------------------------------------------------------------------------- set invariances
@pytest.mark.parametrize("shape", SHAPES)
def test_permutation_invariance(shape):
    """Without slot embeddings the object list is a set: the outputs do not depend on its order."""
    n, f = shape
    m = build(n, f, {"classification": 2, "regression": 1}, task_queries=2, object_embedding="none").eval()
    x, mask = batch(4, n, f)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, out_p = m(x, mask), m(x[:, perm], mask[:, perm])
    torch.testing.assert_close(out_p, out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])                                   # outputs do depend on the event


def test_slot_embedding_tells_objects_apart():
    """Issue 29: with ``object_embedding: slot`` (the default) the slot says what an object is: the same features
    in another slot give other outputs, and a hidden object's mask token differs per slot; padding in the slots
    an event does not fill still changes nothing."""
    m = build(6, 4, {"classification": 2, "regression": 1}).eval()
    assert m.encoder.slot is not None and tuple(m.encoder.slot.shape) == (6, 16)
    x, mask = batch(4, 6, 4)
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    with torch.no_grad():
        out, out_p = m(x, mask), m(x[:, perm], mask[:, perm])
        assert not torch.allclose(out_p[0], out[0], atol=1e-4)                  # lepton <-> MET swapped: another event
        x2 = x.clone()
        x2[~mask] = torch.randn(int((~mask).sum()), 4) * 100
        torch.testing.assert_close(m(x2, mask), out, atol=1e-5, rtol=1e-5)
        hidden = torch.zeros_like(mask)
        hidden[0, 2] = hidden[0, 3] = True                                         # two jets hidden in event 0
        pred = m.reconstruct_hidden(torch.zeros_like(x), mask, hidden)
        assert not torch.allclose(pred[0, 2], pred[0, 3], atol=1e-5)             # each mask token knows its slot


def test_shared_query_against_one_per_task():
    """``query_sharing: shared``: one set of queries that every task reads (the baseline of issue 29's ablation)."""
    tasks = {"classification": 2, "regression": 1}
    per_task, shared = build(6, 4, tasks, task_queries=2), build(6, 4, tasks, task_queries=2, query_sharing="shared")
    assert per_task.queries.shape[0] == 4 and shared.queries.shape[0] == 2
    assert per_task.query_labels() == ["classification q1", "classification q2", "regression q1", "regression q2"]
    assert shared.query_labels() == ["shared q1", "shared q2"]
    x, mask = batch(4, 6, 4)
    assert shared(x, mask).shape == (4, 3) and shared.task_attention(x, mask).shape == (4, 2, 6)
    task_loss(shared(x, mask), tasks).backward()
    assert shared.queries.grad is not None and shared.queries.grad.abs().sum() > 0


def test_padding_invariance():
    m = build(6, 4, {"classification": 2, "regression": 1}, object_embedding="none").eval()
    x, mask = batch(4, 6, 4)
    garbage = torch.randn(4, 5, 4) * 100
    x2 = torch.cat([x, garbage], dim=1)                                        # (4, 11, 4)
    mask2 = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    x2[~mask2] = torch.randn(int((~mask2).sum()), 4) * 100                     # garbage in existing padding too
    with torch.no_grad():
        out, out2 = m(x, mask), m(x2, mask2)
        # float 0/1 masks are accepted like bool ones
        out3 = m(x2, mask2.float())
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out3, out, atol=1e-5, rtol=1e-5)


def test_all_padded_event_is_finite():
    m = build(6, 4, {"classification": 2, "regression": 1})
    x, mask = batch(3, 6, 4)
    mask[1] = False
    x[1] = torch.randn(6, 4) * 50                                              # garbage under padding
    out = m(x, mask)
    assert torch.isfinite(out).all()
    task_loss(out, {"classification": 2, "regression": 1}).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # the other events are unaffected by the empty one
    with torch.no_grad():
        torch.testing.assert_close(m(x[[0, 2]], mask[[0, 2]]), out[[0, 2]].detach(), atol=1e-5, rtol=1e-5)
    # a batch with no real object at all: pretraining loss 0, not NaN, still differentiable
    ploss = m(x, torch.zeros_like(mask), pretrain=True)
    assert ploss.item() == 0.0
    ploss.backward()


# --------------------------------------------------------------------------- pretraining
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_hidden_count_rule(ratio):
    n_real = torch.arange(0, 21)
    k = hidden_counts(n_real, ratio)
    for n, kk in zip(n_real.tolist(), k.tolist()):
        want = 0 if n == 0 else 1 if n == 1 else min(max(1, math.ceil(round(ratio * n, 9))), n - 1)
        assert kk == want, (n, kk, want)
    assert hidden_counts(torch.tensor([10]), 0.3).item() == 3                 # not 4 from 0.3 * 10 = 3.0000000000000004
    m = build(20, 7, mask_ratio=ratio)
    _, mask = batch(16, 20, 7, seed=5)
    mask[3] = False
    hidden = m.sample_hidden(mask)
    assert not (hidden & ~mask).any()                                          # only real objects are hidden
    torch.testing.assert_close(hidden.sum(1), hidden_counts(mask.sum(1), ratio))
    assert ((mask & ~hidden).sum(1) >= 1)[mask.sum(1) >= 2].all()             # something stays visible


def test_pretrain_loss_is_mse_over_hidden_real_objects():
    m = build(6, 4).eval()
    x, mask = batch(4, 6, 4)
    hidden = m.sample_hidden(mask)
    loss = m.pretrain_loss(x, mask, hidden)
    pred = m.reconstruct_hidden(x, mask, hidden)
    want = (pred - x).pow(2).mean(-1)[hidden].mean()
    torch.testing.assert_close(loss, want)
    # garbage under padding changes nothing; changing a hidden object's target changes the loss
    x_pad = x.clone()
    x_pad[~mask] = 1e3
    torch.testing.assert_close(m.pretrain_loss(x_pad, mask, hidden), loss)
    x_vis = x.clone()
    x_vis[hidden] += 1.0
    assert not torch.allclose(m.pretrain_loss(x_vis, mask, hidden), loss)
    # hidden objects' own features never reach the encoder (replaced by the mask token)
    torch.testing.assert_close(m.reconstruct_hidden(x_vis, mask, hidden), pred)


def test_pretrain_loss_decreases():
    """Objects of an event share one feature vector (plus noise): hidden ones are predictable from the rest."""
    m = build(6, 4, dropout=0.0)
    _, mask = batch(8, 6, 4, seed=7)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(8, 1, 4, generator=g) + 0.1 * torch.randn(8, 6, 4, generator=g)) * mask[..., None]

    def expected_loss() -> float:                                              # mean over 16 random hidings
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(m.pretrain_loss(x, mask, m.sample_hidden(mask)).item() for _ in range(16)) / 16

    before = expected_loss()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(30):
        opt.zero_grad()
        loss = m(x, mask, pretrain=True)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    after = expected_loss()
    assert after < 0.3 * before, (before, after)


# --------------------------------------------------------------------------- task heads
def test_each_task_reads_its_own_head():
    tasks = {"classification": 2, "regression": 1}
    m = build(6, 4, tasks, task_queries=2).eval()
    x, mask = batch()
    with torch.no_grad():
        out = m(x, mask)
        assert out.shape == (4, 3)
        m.heads["regression"].weight.zero_()
        m.heads["regression"].bias.zero_()
        out2 = m(x, mask)
    torch.testing.assert_close(out2[:, :2], out[:, :2])
    assert (out2[:, 2] == 0).all() and not (out[:, 2] == 0).all()


@pytest.mark.parametrize("mixing", [False, True])
def test_head_mixing_lets_tasks_exchange_information(mixing):
    m = build(6, 4, {"classification": 2, "regression": 1}, task_queries=2, head_depth=2, head_mixing=mixing).eval()
    x, mask = batch()
    with torch.no_grad():
        out = m(x, mask)
        m.queries[2:].add_(torch.randn(2, m.queries.shape[1]))                # the regression task's queries
        out2 = m(x, mask)
    assert not torch.allclose(out2[:, 2], out[:, 2])
    if mixing:                                                                 # the other task sees it
        assert not torch.allclose(out2[:, :2], out[:, :2])
    else:                                                                      # independent heads
        torch.testing.assert_close(out2[:, :2], out[:, :2])


def test_head_mixing_changes_params_and_outputs():
    on = build(6, 4, {"classification": 2}, head_mixing=True).eval()
    off = build(6, 4, {"classification": 2}, head_mixing=False).eval()
    n_on, n_off = (sum(p.numel() for p in mm.parameters()) for mm in (on, off))
    assert n_on > n_off
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and unexpected and all("self_attn" in k or "norm_self" in k for k in unexpected)
    x, mask = batch()
    with torch.no_grad():
        assert not torch.allclose(on(x, mask), off(x, mask))


# --------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("finetune", ["linear", "full"])
def test_linear_probe_trains_only_heads(finetune):
    m = build(6, 4, {"classification": 2, "regression": 1}, finetune=finetune)
    x, mask = batch()
    task_loss(m(x, mask), {"classification": 2, "regression": 1}).backward()
    enc = [p.grad for p in m.encoder.parameters()]
    if finetune == "linear":
        assert all(g is None for g in enc)
    else:
        assert all(g is not None for g in enc) and sum(g.abs().sum() for g in enc) > 0
    for name, p in m.named_parameters():
        if name.startswith(("queries", "head_blocks", "head_norm", "heads")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.queries.grad.abs().sum() > 0 and m.heads["classification"].weight.grad.abs().sum() > 0


def test_encoder_transfers_from_pretrained_state_dict():
    pre = build(6, 4, {"out": 2}, seed=0)
    x, mask = batch()
    opt = torch.optim.Adam(pre.parameters(), lr=1e-3)
    for _ in range(2):                                                         # a (tiny) pretraining
        opt.zero_grad()
        pre(x, mask, pretrain=True).backward()
        opt.step()
    fresh = build(6, 4, {"classification": 2, "regression": 1}, seed=1, finetune="linear").eval()
    pre.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.encode(x, mask), pre.encode(x, mask))
    # what the loop does: copy every entry whose key and shape match
    own = fresh.state_dict()
    src = {k: v for k, v in pre.state_dict().items() if k in own and own[k].shape == v.shape}
    assert {k for k in own if k.startswith("encoder.")} <= set(src)
    fresh.load_state_dict(src, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x, mask), pre.encode(x, mask), atol=0, rtol=0)
        assert fresh(x, mask).shape == (4, 3)


def test_per_feature_reconstruction_losses():
    """Issue 29: ``recon_loss: per_feature``: log pT, periodic phi, b-tag as a class (event_objects' 6 x 4
    layout); errors reported in standardized units as the MSE form's; other layouts fall back to MSE."""
    import math as m

    from trainables.layers.object_recon import FeatureLosses

    fl = FeatureLosses(["pt", "eta", "phi", "btag"], mean=[50.0, 0.0, 0.0, 0.2], std=[30.0, 1.0, 1.8, 0.4])
    raw = torch.tensor([[[80.0, 0.5, 3.1, 1.0]]])                             # pT 80 GeV, phi near +pi, tagged
    x = (raw - fl.mean) / fl.std
    perfect = torch.stack([torch.log1p(raw[..., 0]), x[..., 1], x[..., 2], torch.full_like(x[..., 0], 20.0)], -1)
    assert fl.loss(perfect, x).item() < 1e-6
    assert torch.allclose(fl.as_inputs(perfect), x, atol=1e-4)
    wrapped = perfect.clone()
    wrapped[..., 2] = ((-3.1 - 0.02 - 0.0) - 0.0) / 1.8 + 0 * x[..., 2]       # -pi side: 0.08 rad away on the circle
    err = fl.errors(wrapped, x)[..., 2].item() * 1.8 ** 2
    assert abs(err - (2 * m.pi - 6.22) ** 2) < 1e-3                          # not (6.22)^2: the circle, not the line
    assert fl.loss(wrapped, x).item() < 0.01
    m6 = build(6, 4, {"classification": 2}, recon_loss="per_feature")
    assert m6.feature_losses is not None and m6.feature_losses.names == ["pt", "eta", "phi", "btag"]
    xb, mask = batch(4, 6, 4)
    loss = m6(xb, mask, pretrain=True)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    hidden = m6.sample_hidden(mask, torch.Generator().manual_seed(0))
    assert m6.masked_errors(xb, mask, hidden).shape == (4, 6, 4)
    other = build(20, 7, {"classification": 2}, recon_loss="per_feature")    # generic names: MSE on every feature
    xo, mo = batch(4, 20, 7)
    h = other.sample_hidden(mo, torch.Generator().manual_seed(0))
    pred = other.reconstruct_hidden(xo, mo, h)
    want = ((pred - xo).pow(2).mean(-1) * h).sum() / h.sum()
    assert torch.allclose(other.pretrain_loss(xo, mo, h), want, atol=1e-6)


def test_type_embedding_from_the_files_object_type(tmp_path):
    """``object_embedding: type``: slots of one type (the four jets of event_objects) share an embedding, read
    from the file's object_type; a file without one gives each slot its own (the slot embedding)."""
    import h5py
    import numpy as np

    from e2e_search.data.inspect import inspect
    from e2e_search.spec.loader import validate
    from tests.conftest import base_config, write_objects

    fam = get_family("event_transformer")
    torch.manual_seed(0)
    typed = fam.build(fam.params(**SMALL, object_embedding="type"), n_objects=6, n_features=4, num_outputs=2,
                      tasks={"classification": 2}, slot_types=[0, 1, 2, 2, 2, 2]).eval()
    assert tuple(typed.encoder.slot.shape) == (3, 16) and typed.encoder.slot_type.tolist() == [0, 1, 2, 2, 2, 2]
    x, mask = batch(4, 6, 4)
    swap = [0, 1, 3, 2, 4, 5]                                                  # two jets: one type, exchangeable
    lep = [1, 0, 2, 3, 4, 5]                                                   # lepton <-> missing pT: two types
    with torch.no_grad():
        torch.testing.assert_close(typed(x[:, swap], mask[:, swap]), typed(x, mask), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(typed(x[:, lep], mask[:, lep])[0], typed(x, mask)[0], atol=1e-4)
    untyped = build(6, 4, {"classification": 2}, object_embedding="type")
    assert tuple(untyped.encoder.slot.shape) == (6, 16)
    data = write_objects(tmp_path / "o.h5", n=40)
    with h5py.File(data, "a") as f:
        f["object_type"] = np.tile(np.array([0, 1, 2, 2, 2, 2], np.int8), (40, 1))
    cfg = base_config(tmp_path, data, family="event_transformer",
                      data={"image_key": "X_objects", "mask_key": "mask", "val_fraction": 0.25})
    cfg["params"] = {"object_embedding": "type", "pretrain_epochs": 0, "embed_dim": 16, "num_heads": 2, "depth": 1}
    setup = inspect(validate(cfg, source="t.yaml"))
    assert setup.slot_types == [0, 1, 2, 2, 2, 2]
    from trainables.core.model import build_model

    m = build_model("event_transformer", cfg["params"], setup)
    assert tuple(m.encoder.slot.shape) == (3, 16)
