"""Tune callbacks that belong to the driver that runs them.

Tune saves the ``RunConfig`` with the experiment (callbacks included) and ``Tuner.restore`` unpickles it, so a
resumed search would get the dead driver's callbacks, with its MLflow client and its counts. A :class:`Live`
callback pickles as a reference to "this driver's callback of that class": the resumed driver registers its
own (:func:`register`) before it restores, and Tune's copy unpickles to it. Public pickling only; no Tune
internals are touched."""

from __future__ import annotations

from typing import Any

_LIVE: dict[str, Any] = {}


def _driver_callback(kind: str) -> Any:
    try:
        return _LIVE[kind]
    except KeyError:
        raise RuntimeError(f"no live {kind} callback in this process: register it before Tuner.restore") from None


class Live:
    """Mix-in of a Tune callback whose pickled copies stand for the driver's registered instance."""

    def __reduce__(self):
        return _driver_callback, (type(self).__qualname__,)


def register(callbacks: list) -> None:
    """Make ``callbacks`` (those that are :class:`Live`) this driver's, for Tune's copies to resolve to."""
    for cb in callbacks:
        if isinstance(cb, Live):
            _LIVE[type(cb).__qualname__] = cb
