"""The epochs of one trial: train, validate, report, checkpoint; the same on every runner (see session.py).

Every epoch each rank reports the same metrics and rank 0 attaches a checkpoint folder (TrialCheckpoint,
metrics.json, validation predictions, attention maps). A restarted trial resumes from the latest one.
Families that declare ``pretraining`` first train ``pretrain_epochs`` epochs on their self-supervised loss
(``model(x, pretrain=True)``), then on the task; epochs count across both phases.
Families declaring ``masked_objects`` log the ``val_recon_*`` reconstruction errors of hidden objects in
pretraining epochs (core/recon.py) and carry the last ones into the task epochs; families declaring
``task_attention`` save the task queries' attention over the objects (``attention.npz``) with every task epoch.

``TrialConfig.stop_epoch`` ends the trial early (the schedule still spans ``max_epochs``) and
``score_split`` scores the last epoch's model once on the test split (core/scoring.py): ``e2e-search confirm``.

A NaN/Inf loss ends the trial for good: the reason goes to ``nonfinite_flag`` and a retry that finds it
stops at once instead of computing the same numbers again from the last checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainables.core.checkpoint import TrialCheckpoint, checkpoint_score
from trainables.core.contract import TrialConfig
from trainables.core.engine import Engine, EpochResult, NonFiniteLoss, gather
from trainables.core.layout import ATTENTION_FILE, PREDICTIONS_FILE, TEST_PREDICTIONS_FILE
from trainables.core.model import first_item, inference_latency_ms, to_device, unwrap
from trainables.core.predictions import save_predictions
from trainables.metrics import task_metrics
from trainables.registry import get_family

if TYPE_CHECKING:
    from trainables.core.scoring import Scored

__all__ = ["NonFiniteLoss", "train_trial"]


def train_trial(cfg: TrialConfig, session) -> None:
    """Run trial ``cfg`` on ``session`` (a core.session.Session) from its latest checkpoint to
    ``cfg.max_epochs``. Raises NonFiniteLoss (recorded in ``cfg.nonfinite_flag``) on a NaN/Inf loss."""
    flag = cfg.nonfinite_flag
    if flag and os.path.exists(flag):
        with open(flag) as f:
            raise NonFiniteLoss(f"{f.read().strip()} (not retried)")
    try:
        _epochs(cfg, session)
    except NonFiniteLoss as e:
        if flag:
            os.makedirs(os.path.dirname(flag), exist_ok=True)
            with open(flag, "w") as f:
                f.write(str(e))
        raise


def _rollout_examples(val_ds, data, k: int = 4) -> tuple[torch.Tensor, list[str]] | None:
    """A few validation images (the classes in turn) for the attention-rollout plots; None for object lists."""
    if data.kind != "images" or len(val_ds) == 0:
        return None
    from trainables.attention.rollout import pick_examples

    labels = np.asarray(val_ds.labels)
    classes = None if data.task == "regression" else (labels if labels.ndim == 1 else labels[:, 0]).astype(int)
    idx = pick_examples(None if classes is None else list(classes[:256]), len(val_ds), k)
    if classes is not None:
        titles = [f"class {classes[i]}" for i in idx]
    else:
        titles = [f"true {float(labels[i]) * data.target_std + data.target_mean:.4g}" for i in idx]
    return torch.stack([val_ds[i][0] for i in idx]), titles


def _save_attention(path: str, model: torch.nn.Module, shown, device) -> None:
    """attention.npz beside the checkpoint; a failure here never stops training."""
    from trainables.attention.rollout import save_attention

    images, titles = shown
    try:
        save_attention(path, model, images.to(device), titles)
    except Exception as e:  # noqa: BLE001 - the map is a diagnostic, the trial goes on
        print(f"[e2e-search] attention rollout skipped: {type(e).__name__}: {e}", flush=True)


def _save_task_attention(path: str, eng: Engine, device) -> None:
    """attention.npz (task queries over the objects) beside the checkpoint; a failure never stops training."""
    from trainables.attention.tasks import save_task_attention

    try:
        save_task_attention(path, unwrap(eng.model), eng.val_ds, eng.data, device)
    except Exception as e:  # noqa: BLE001 - the map is a diagnostic, the trial goes on
        print(f"[e2e-search] task attention skipped: {type(e).__name__}: {e}", flush=True)


def _epochs(cfg: TrialConfig, session) -> None:
    entered = time.time()
    # Where a trial's time goes, reported with the first epoch this process trains (bench/orchestration.py):
    # startup_s: the trial's start -> this process training (placement, worker processes, process group);
    # setup_s: -> the first step (data opened and cached, model built, checkpoint restored).
    startup: dict[str, Any] = {"startup_s": entered - cfg.launched_at} if cfg.launched_at else {}
    torch.set_num_threads(max(1, int(cfg.cpus)))
    rank, world, device = session.rank, session.world, session.device
    eng = Engine(cfg, session)
    caps = get_family(cfg.family).capabilities
    shown = _rollout_examples(eng.val_ds, eng.data) if rank == 0 and caps.rollout else None
    recon_on = caps.masked_objects and eng.pretrain_epochs > 0
    resumed = _resume(cfg, session, eng, startup)
    if resumed is None:
        return
    start_epoch, recon = resumed  # recon: the last pretraining epoch's val_recon_* figures

    latency_ms: float | None = None
    startup["setup_s"] = time.time() - entered
    report_s: float | None = None  # the previous epoch's report (persisting its checkpoint)
    for epoch in range(start_epoch, cfg.last_epoch + 1):
        pretraining = epoch <= eng.pretrain_epochs
        metrics, train, val = _train_validate(eng, epoch, pretraining, world)
        predictions: tuple[np.ndarray, np.ndarray] | None = None
        if pretraining:
            recon = _pretraining_metrics(cfg, eng, metrics, train, val, recon_on, recon, device)
        else:
            predictions, latency_ms = _task_metrics(eng, metrics, train, val, latency_ms, device)
        metrics.update(recon)
        scored = _score_last_epoch(cfg, eng, epoch, pretraining, metrics)
        metrics["checkpoint_score"] = checkpoint_score(metrics, cfg.metric, cfg.mode)
        if epoch == start_epoch:
            metrics.update(startup)
        if report_s is not None:
            metrics["report_s"] = report_s
        report_s = _report(session, eng, epoch, metrics, predictions, scored, shown, caps.task_attention)


def _resume(cfg: TrialConfig, session, eng: Engine, startup: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """Restore the latest checkpoint, if any -> (the first epoch to train, the val_recon_* figures it holds);
    None when the trial has no epoch left to train (its final result is then reported again)."""
    start_epoch = 1
    recon: dict[str, float] = {}
    with session.latest_checkpoint() as folder:
        state = TrialCheckpoint.load(folder, map_location=session.device) if folder is not None else None
    if state is not None:
        eng.restore(state)
        exploited = {}  # PBT: another trial's weights; said with the first report
        if state.trial_id and cfg.trial_id and state.trial_id != cfg.trial_id:
            exploited = {"pbt_source": state.source}
        startup.update(exploited)
        start_epoch = state.epoch + 1
        recon = {k: v for k, v in state.metrics.items() if k.startswith("val_recon")}
        if start_epoch > cfg.last_epoch:  # restarted after its last epoch (the driver died before recording it),
            # or PBT gave it a finished donor's last weights: the search still needs the trial's final result
            session.report({**state.metrics, **exploited})
            return None
    return start_epoch, recon


def _train_validate(eng: Engine, epoch: int, pretraining: bool,
                    world: int) -> tuple[dict[str, Any], EpochResult, EpochResult]:
    """Train and validate one epoch -> (the metrics of every epoch, the training result, the validation result)."""
    t0 = time.time()
    train = eng.train_epoch(epoch, pretraining)
    val = eng.evaluate(epoch, pretraining)
    metrics: dict[str, Any] = {"epoch": epoch, "lr": eng.sched.get_last_lr()[0], "epoch_time_s": time.time() - t0,
                               "train_samples_per_s": train.samples * world / max(train.seconds, 1e-9),
                               "num_params": eng.num_params}
    return metrics, train, val


def _pretraining_metrics(cfg: TrialConfig, eng: Engine, metrics: dict[str, Any], train: EpochResult,
                         val: EpochResult, recon_on: bool, recon: dict[str, float], device) -> dict[str, float]:
    """A pretraining epoch's losses into ``metrics`` -> the val_recon_* figures (this epoch's where measured)."""
    # no task metric yet: NaN for the search metrics (Tune needs the keys; ASHA skips NaN)
    metrics.update({"pretrain_loss": train.loss, "val_pretrain_loss": val.loss})
    metrics.update({m: float("nan") for m in cfg.metrics})
    if recon_on:
        from trainables.core.recon import validation_recon

        recon = validation_recon(eng.model, eng.val_loader, device)
    return recon


def _task_metrics(eng: Engine, metrics: dict[str, Any], train: EpochResult, val: EpochResult,
                  latency_ms: float | None, device) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """A task epoch's losses and task metrics into ``metrics`` -> (every rank's validation outputs and
    targets, the inference latency)."""
    data = eng.data
    metrics.update({"train_loss": train.loss, "val_loss": val.loss})
    assert val.outputs is not None and val.targets is not None  # a task epoch's evaluate() returns them
    out_all, y_all = gather(val.outputs), gather(val.targets)
    metrics.update(task_metrics(data.task, data.num_classes, out_all, y_all, data.target_mean,
                                data.target_std))
    if latency_ms is None:  # a cost objective for multi-objective searches; measured once per trial
        latency_ms = inference_latency_ms(unwrap(eng.model), to_device(first_item(eng.val_ds[0][0]), device))
    metrics["latency_ms"] = latency_ms
    return (out_all, y_all), latency_ms


def _score_last_epoch(cfg: TrialConfig, eng: Engine, epoch: int, pretraining: bool,
                      metrics: dict[str, Any]) -> Scored | None:
    """With ``score_split``, the last epoch's model scored on that split (its metrics into ``metrics``)."""
    if cfg.score_split and epoch == cfg.last_epoch and not pretraining:  # once, the model as trained
        from trainables.core.scoring import score_split

        scored = score_split(eng, cfg.score_split)
        metrics.update(scored.metrics)
        return scored
    return None


def _report(session, eng: Engine, epoch: int, metrics: dict[str, Any],
            predictions: tuple[np.ndarray, np.ndarray] | None, scored: Scored | None, shown,
            task_attention: bool) -> float:
    """Report the epoch, rank 0 with its checkpoint folder -> report_s, the seconds the report took."""
    if session.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            saving = time.time()
            _save_checkpoint(tmp, eng, epoch, metrics, predictions, scored, shown, task_attention, session.device)
            metrics["save_s"] = time.time() - saving  # written to a local folder; report_s persists it
            reporting = time.time()
            session.report(metrics, Path(tmp))
    else:
        reporting = time.time()
        session.report(metrics)
    return time.time() - reporting


def _save_checkpoint(tmp: str, eng: Engine, epoch: int, metrics: dict[str, Any],
                     predictions: tuple[np.ndarray, np.ndarray] | None, scored: Scored | None, shown,
                     task_attention: bool, device) -> None:
    """The epoch's checkpoint folder: the TrialCheckpoint, and after a task epoch the validation predictions
    and attention maps; the test split's predictions when it was scored."""
    data = eng.data
    eng.checkpoint(epoch, metrics).save(tmp)
    if predictions is not None:  # for the trial's plots (e2e_search/record/figures.py)
        out_all, y_all = predictions
        save_predictions(os.path.join(tmp, PREDICTIONS_FILE), out_all, y_all, task=data.task,
                         num_classes=data.num_classes, target_mean=data.target_mean,
                         target_std=data.target_std)
        if shown is not None:
            _save_attention(os.path.join(tmp, ATTENTION_FILE), unwrap(eng.model), shown, device)
        elif task_attention:
            _save_task_attention(os.path.join(tmp, ATTENTION_FILE), eng, device)
    if scored is not None:
        from trainables.core.scoring import save_scored

        save_scored(os.path.join(tmp, TEST_PREDICTIONS_FILE), scored, data)
