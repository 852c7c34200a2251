"""Ray's ``OptunaSearch`` for a study kept in an RDB storage (``search.optuna_storage``) across a killed driver.

The study is written as trials report, Tune's experiment state when it snapshots: a driver killed between the two
can leave a trial COMPLETE in the study that the resumed Tune still reports (its last epoch again). Optuna refuses
to update a finished trial (``UpdateFinishedTrialError``), and that used to end the resumed search; the study
already holds that trial's final state, so the report is dropped.
"""

from __future__ import annotations

from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that ignores reports of trials its study has already finished (see the module)."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            pass

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        try:
            super().on_trial_complete(trial_id, result, error)
        except UpdateFinishedTrialError:
            pass
