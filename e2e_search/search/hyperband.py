"""HyperBand for ``scheduler.type: hyperband``: Ray's ``HyperBandScheduler`` (Li et al., "Hyperband: A Novel
Bandit-Based Approach to Hyperparameter Optimization", JMLR 2018) with one fix.

Ray's ``on_trial_remove`` processes unfinished brackets only. When a trial's last epoch reaches Tune as its
completion rather than as a result, the other trials of its bracket that were paused at the last rung, waiting
for it, were never resumed nor stopped, and the search never ended. Here a trial that ends with its bracket
then finished stops the bracket's paused trials. Imported only where a search uses it (it imports Ray)."""

from __future__ import annotations

from ray.tune.schedulers import HyperBandScheduler


class HyperBand(HyperBandScheduler):
    def on_trial_remove(self, tune_controller, trial):
        bracket = self._trial_info[trial][0]
        super().on_trial_remove(tune_controller, trial)
        if bracket.finished():
            bracket.cleanup_full(tune_controller)  # stops its PAUSED trials (Tune calls back here for each)
