"""A champion as an MLflow Model (pyfunc flavour): ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and
``mlflow models predict -m models:/<name>@champion --env-manager local`` take rows exactly as the search's data
file holds them and return class probabilities or the target in its physical units (trainables/inference.py).

The model folder holds the trial's ``checkpoint.pt`` as an artifact; e2e_search/record/champion_model.py writes it
when a search or ``confirm`` registers a champion.
"""

from __future__ import annotations

import numpy as np
from mlflow.pyfunc import PythonModel


class ChampionModel(PythonModel):
    """``predict(model_input)``: images (batch, H, W, C_file) or (batch, C_file, H, W) as in the file, float32; object
    lists {"objects": (batch, N, F) float32, "mask": (batch, N) bool}. -> float32 probabilities (batch, C), the
    physical target (batch,), or for a joint task (batch, C + 1)."""

    def load_context(self, context) -> None:
        from trainables.inference import RawInputModel, rebuild

        self.rebuilt = rebuild(context.artifacts["checkpoint"])
        self.raw = None if self.rebuilt.inputs == "hits" else RawInputModel(self.rebuilt)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        from trainables.inference import predict_raw

        if self.rebuilt.inputs == "objects":
            if not isinstance(model_input, dict) or {"objects", "mask"} - set(model_input):
                raise ValueError("an object-list model takes {'objects': (batch, N, F), 'mask': (batch, N)}")
            arrays = [np.asarray(model_input["objects"], np.float32), np.asarray(model_input["mask"], bool)]
        else:
            arrays = [np.asarray(model_input, np.float32)]
        return predict_raw(self.rebuilt, arrays, self.raw)
