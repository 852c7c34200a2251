"""Names of the object slots and features of event-level data (object lists), for metrics and plots.

Files in the layout ``e2e-search data generate event_objects`` writes and the HIGGS-style CSV converter
produces (e2e_search/data/objects.py, e2e_search/data/physics/events.py) hold (N, 6, 4) objects: slot 0 the lepton,
1 the missing transverse momentum, 2-5 up to four jets (pT-ordered); features pt, eta, phi, b-tag. Those
get the physics names; any other shape gets ``obj<i>`` / ``f<j>`` (0-based). Every name is a valid MLflow
key fragment (trainables/names.py).
"""

from __future__ import annotations

EVENT_OBJECTS = ("lepton", "met", "jet1", "jet2", "jet3", "jet4")
EVENT_FEATURES = ("pt", "eta", "phi", "btag")


def slot_names(n_objects: int, n_features: int) -> tuple[list[str], list[str]]:
    """(object slot names (n_objects,), feature names (n_features,)) for data of that shape."""
    if (n_objects, n_features) == (len(EVENT_OBJECTS), len(EVENT_FEATURES)):
        return list(EVENT_OBJECTS), list(EVENT_FEATURES)
    return [f"obj{i}" for i in range(n_objects)], [f"f{j}" for j in range(n_features)]
