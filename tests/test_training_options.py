"""Training speed options (TrainParams.precision, compile, grad_accum_steps, channels_last) and their helpers.

Fast, CPU only, no Ray: the helpers the worker loop calls, on tiny models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from e2e_search.spec.loader import validate
from tests.conftest import base_config
from trainables.core.engine import accumulation_groups, autocast, autocast_dtype, make_optimizer
from trainables.core.model import channels_last as _channels_last
from trainables.core.model import is_convnet, use_channels_last
from trainables.errors import UserError
from trainables.params import TrainParams
from trainables.registry import get_family


def _vit(**over):
    fam = get_family("vit")
    p = fam.params.model_validate({"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, **over})
    return fam.build(p, in_chans=3, img_size=(16, 16), num_outputs=2)


def _resnet():
    fam = get_family("resnet15")
    return fam.build(fam.params.model_validate({}), in_chans=3, img_size=(16, 16), num_outputs=2)


def test_defaults_keep_cpu_training_as_it_was():
    tp = TrainParams()
    assert (tp.precision, tp.compile, tp.grad_accum_steps, tp.channels_last) == ("auto", False, 1, "auto")
    assert autocast_dtype(tp.precision, "cpu") is None  # fp32 on the CPU
    assert use_channels_last(tp.channels_last, _resnet(), "cpu") is False
    opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), 1e-3, 0.05, "cpu")
    assert not opt.param_groups[0].get("fused")
    assert accumulation_groups(7, tp.grad_accum_steps) == [1] * 7


def test_precision():
    assert autocast_dtype("auto", "cuda") is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("fp32", "cuda") is None
    with pytest.raises(ValueError):
        TrainParams(precision="fp16")


def test_bf16_autocast_trains_a_vit_on_cpu():
    torch.manual_seed(0)
    model = _vit()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    with autocast(autocast_dtype("bf16", "cpu"), "cpu"):
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_channels_last_auto_only_for_convnets_on_gpu():
    vit, cnn = _vit(), _resnet()
    assert is_convnet(cnn) and not is_convnet(vit)  # a patch embedding (kernel == stride) is no convnet
    assert use_channels_last("auto", cnn, "cuda") is True
    assert use_channels_last("auto", vit, "cuda") is False
    assert use_channels_last("auto", cnn, "cpu") is False
    assert use_channels_last(True, vit, "cpu") is True and use_channels_last(False, cnn, "cuda") is False
    x = torch.randn(2, 3, 8, 8)
    assert _channels_last(x, True).is_contiguous(memory_format=torch.channels_last)
    assert _channels_last(x, False) is x
    objects = torch.randn(2, 6, 4)
    assert _channels_last(objects, True) is objects  # object lists are left alone


def test_channels_last_model_gives_the_same_outputs():
    torch.manual_seed(0)
    cnn = _resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = cnn(x)
    out = cnn.to(memory_format=torch.channels_last)(_channels_last(x, True))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_accumulation_groups():
    assert accumulation_groups(10, 3) == [3, 3, 3, 1]
    assert accumulation_groups(4, 2) == [2, 2]
    assert accumulation_groups(1, 4) == [1]
    assert accumulation_groups(0, 2) == []
    with pytest.raises(ValueError):
        TrainParams(grad_accum_steps=0)


def test_two_half_batches_accumulate_to_the_full_batch_gradient():
    """What the loop does with grad_accum_steps=2: (loss / 2).backward() per half, one step."""
    torch.manual_seed(0)
    model = _vit()
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 2
    F.cross_entropy(model(x), y).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    size = accumulation_groups(2, 2)[0]
    for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
        (F.cross_entropy(model(xs), ys) / size).backward()
    for n, g in full.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6)


def test_device_loss_sum_equals_the_python_float_sum():
    """The loop sums losses on the device in float64: on the CPU the same number as summing loss.item()."""
    torch.manual_seed(0)
    losses = [torch.rand(()) * 3 for _ in range(50)]
    sizes = [64] * 49 + [17]
    py = 0.0
    dev = torch.zeros((), dtype=torch.float64)
    for loss, n in zip(losses, sizes):
        py += loss.item() * n
        dev += loss.detach().double() * n
    assert float(dev) == py


def test_compiled_wrapper_shares_parameters_and_keeps_checkpoint_keys():
    """The loop trains through torch.compile(model) but saves model.state_dict(): plain key names."""
    torch.manual_seed(0)
    model = _vit()
    compiled = torch.compile(model, backend="eager")
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())
    opt = make_optimizer(model.parameters(), 1e-2, 0.0, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    F.cross_entropy(compiled(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_options_in_a_search_space(tmp_path):
    cfg = base_config(tmp_path, tmp_path / "x.h5")
    cfg["params"].update({"precision": {"type": "choice", "values": ["bf16", "fp32"]}, "compile": True,
                          "grad_accum_steps": {"type": "choice", "values": [1, 2]}, "channels_last": False})
    validate(cfg, source="t.yaml")
    cfg["params"]["grad_accum_steps"] = 0
    with pytest.raises(UserError) as e:
        validate(cfg, source="t.yaml")
    assert e.value.key == "params.grad_accum_steps"
    cfg["params"]["grad_accum_steps"] = 1
    cfg["params"]["precision"] = "fp16"
    with pytest.raises(UserError) as e:
        validate(cfg, source="t.yaml")
    assert e.value.key == "params.precision"


def test_core_accumulating_two_half_batches_matches_full_batches(tmp_path):
    """grad_accum_steps=2 at batch 8 trains (up to rounding) the same weights as batch 16: same sample order."""
    from e2e_search.data.inspect import inspect
    from tests.conftest import write_e2e
    from trainables.core.checkpoint import TrialCheckpoint
    from trainables.core.contract import TrialConfig
    from trainables.core.loop import train_trial
    from trainables.core.session import LocalSession

    path = write_e2e(tmp_path / "d.h5", n=80, size=16)
    raw = base_config(tmp_path, path)
    raw["data"].update({"val_fraction": 0.2, "test_fraction": 0.0})
    setup = inspect(validate(raw, source="t.yaml"))
    assert len(setup.train) == 64
    finals = {}
    for bs, accum in ((16, 1), (8, 2)):
        session = LocalSession(tmp_path / f"bs{bs}")
        train_trial(TrialConfig(family="vit", params={"batch_size": bs, "grad_accum_steps": accum, "patch_size": 4,
                                                      "depth": 1, "embed_dim": 16, "num_heads": 2, "lr": 3e-3},
                                data=setup.to_dict(), max_epochs=2, metric="val_loss", mode="min",
                                metrics=["val_loss"]), session)
        metrics, folder = session.reports[-1]
        assert metrics["epoch"] == 2 and metrics["train_samples_per_s"] > 0
        state = TrialCheckpoint.load(folder)
        finals[accum] = state
    assert finals[1].scheduler["last_epoch"] == finals[2].scheduler["last_epoch"] == 8  # optimizer steps
    # atol 5e-5: Adam divides by sqrt(v), so a float32 rounding difference in a near-zero gradient moves that
    # weight by up to ~1e-5 after 8 steps at lr 3e-3 (1.3e-5 seen on one bias with the stratified split).
    for k, v in finals[1].model.items():
        torch.testing.assert_close(finals[2].model[k], v, rtol=1e-4, atol=5e-5)
