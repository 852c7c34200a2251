"""A trial's parameters: the training hyperparameters every family shares (``TrainParams``), the split of a
trial's parameters into training and family parameters, and the placeholders a search adds (Optuna's
``name__index`` entries, PBT's population member and absent values).

``params`` in the YAML mixes training hyperparameters and the family's own (``Family.params``); the checks of a
search space against them live in e2e_search/spec/params.py.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from trainables.registry import get_family


class TrainParams(BaseModel):
    """Training hyperparameters every family shares."""

    model_config = ConfigDict(extra="ignore")

    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    batch_size: int = Field(default=64, gt=0)
    warmup_epochs: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    """Max gradient norm (0 turns clipping off)."""
    loss: Literal["auto", "cross_entropy", "mse", "huber", "relative"] = "auto"
    """auto: cross_entropy for classification, mse for regression; in a joint task, the regression part's loss."""
    loss_weight: float = Field(default=1.0, ge=0)
    """Joint task: weight of the regression loss (the classification loss has weight 1)."""
    pretrained: str | None = None
    """A checkpoint.pt (of an earlier trial, e.g. a masked-autoencoder pretraining) whose weights with
    matching names and shapes initialize the model before training."""
    seed: int = 0
    label_fraction: float = Field(default=1.0, gt=0, le=1)
    """Fraction of the training events whose labels the task epochs use (the rest serve only ``pretrain_epochs``
    of a family that pretrains): the first of the split's stratified label order, the same for every trial
    (trainables/data/labelled.py). 1.0: every label."""
    # Speed options (docs/search_space.md, "Training speed options"); the defaults keep CPU training as it was.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on a GPU, fp32 on the CPU; bf16: autocast to bfloat16 on any device; fp32: no autocast."""
    compile: bool = False
    """torch.compile the model for training and validation (costs compile time at the start of each trial)."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Optimizer step every this many batches of ``batch_size`` (effective batch = batch_size x this x workers)."""
    channels_last: Literal["auto"] | bool = "auto"
    """Images and conv weights in channels-last memory format. auto: on a GPU, for convolutional networks only."""



def trial_family(cfg_family: str | None, params: dict[str, Any]) -> str:
    """The family a trial trains: its sampled ``family`` when the search is over families."""
    # cfg_family is None only in a search over families, whose trials all sample ``family``
    return cast(str, params.get("family", cfg_family))



def split_params(cfg_family: str | None, params: dict[str, Any]) -> tuple[TrainParams, BaseModel]:
    """Trial params → (training params, family params), defaults filled in."""
    fam = get_family(trial_family(cfg_family, params))
    clean = {k: v for k, v in params.items() if "__" not in k}
    return TrainParams.model_validate(clean), fam.params.model_validate(
        {k: v for k, v in clean.items() if k in fam.params.model_fields}
    )



def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """The trial's parameters without Optuna's helper entries (``name__index`` ...) and PBT's placeholders of
    parameters a trial does not have (e2e_search/search/algorithms.py)."""
    return {k: v for k, v in params.items() if "__" not in k and not (isinstance(v, str) and v == ABSENT)}


ABSENT = "__absent__"
"""PBT: the value of a parameter a population member does not have (an inactive conditional one); dropped
again by :func:`present` before the trial trains and by ``params.public_params`` before MLflow."""



MEMBER = "pbt__member"



def present(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the PBT placeholders (:data:`ABSENT` values, the member index)."""
    return {k: v for k, v in params.items() if k != MEMBER and not (isinstance(v, str) and v == ABSENT)}
