"""What a trial is asked to do: the typed contract between the search (trainables/trial.py) and the core."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainables.data.setup import DataSetup


class TrialConfig(BaseModel):
    """One trial, as the training core receives it (the same on every DDP rank)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    """The trial's family (the sampled one in a search over families)."""
    params: dict[str, Any]
    """The trial's sampled values: the family's parameters and the training ones (e2e_search/spec/params.py)."""
    data: dict[str, Any]
    """``DataSetup.to_dict()``: the file, its preprocessing and the train/val/test index lists."""
    max_epochs: int = Field(ge=1)
    metric: str = "val_loss"
    """The search metric: the best checkpoint is kept by it."""
    mode: Literal["min", "max"] = "min"
    metrics: list[str] = Field(default_factory=lambda: ["val_loss"])
    """Every search metric (NaN placeholders while pretraining: Tune needs the keys)."""
    cpus: float = Field(default=1.0, gt=0)
    """CPU threads torch may use in this process (``resources.cpus_per_worker``)."""
    loader_workers: int = Field(default=0, ge=0)
    nonfinite_flag: str | None = None
    """File that records why the loss went NaN/Inf: a retry that finds it stops at once."""
    launched_at: float | None = None
    trial_id: str | None = None
    """The Tune trial this is (written into its checkpoints): a checkpoint of another trial restored here is a
    PBT exploit, reported as ``pbt_source`` (``<trial id>@<epoch>``) with the first epoch trained after it."""
    """Unix time the trial started (``startup_s`` counts from it)."""
    stop_epoch: int | None = Field(default=None, ge=1)
    """Stop after this epoch (at most ``max_epochs``); the learning-rate schedule still spans ``max_epochs``.
    ``e2e-search confirm`` retrains a finalist up to the epoch it was best at."""
    score_split: Literal["test"] | None = None
    """Score the model of the last epoch once on this split (trainables/core/scoring.py): ``test_*`` metrics
    in that epoch's report, the predictions beside its checkpoint."""

    @property
    def last_epoch(self) -> int:
        """The last epoch this trial trains."""
        return min(self.stop_epoch or self.max_epochs, self.max_epochs)

    def setup(self) -> DataSetup:
        return DataSetup(**self.data)
