"""Search dimensions of ``params`` in the YAML: a fixed value, a choice, a grid or a range.

Pydantic models only (no loading, no registry): :mod:`e2e_search.spec.schema` and
:mod:`e2e_search.spec.params` build on them. A bare YAML value is a :class:`FixedDim`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from trainables.errors import did_you_mean


class StrictModel(BaseModel):
    """A YAML section: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FixedDim(StrictModel):
    """A constant (what a bare YAML value means), optionally conditional."""

    type: Literal["fixed"] = "fixed"
    value: Any
    when: dict[str, Any] | None = None


class ChoiceDim(StrictModel):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    when: dict[str, Any] | None = None


class GridDim(StrictModel):
    """Every value is tried: each combination of grid values is queued first."""

    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)
    when: dict[str, Any] | None = None


class _Range(StrictModel):
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    """Both ends finite: a sampler cannot draw from an infinite range (numpy overflows in the driver)."""
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be smaller than high ({self.high:g}); set low below high "
                             "(for a single value write the value itself, without type)")
        return self


class UniformDim(_Range):
    type: Literal["uniform"]


class LogUniformDim(_Range):
    type: Literal["loguniform"]

    @field_validator("low")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {v:g}); use uniform for ranges that include 0")
        return v


class RandIntDim(_Range):
    """Integers from low to high, both included."""

    type: Literal["randint"]
    low: int
    high: int


class QUniformDim(_Range):
    """Uniform, rounded to a multiple of ``q`` (steps from ``low``)."""

    type: Literal["quniform"]
    q: float = Field(gt=0, allow_inf_nan=False)


DIM_TYPES = ("fixed", "choice", "grid", "uniform", "loguniform", "randint", "quniform")


def _as_dim(v: Any) -> Any:
    if isinstance(v, dict):
        if "type" not in v and "value" in v:  # {value: 2, when: {family: [...]}}: a conditional constant
            return {"type": "fixed", **v}
        if "type" not in v:
            raise ValueError(
                "a search dimension needs 'type'; add type: one of " + ", ".join(DIM_TYPES[1:])
                + " (or write a fixed value without braces, or {value: ..., when: {...}} for a conditional one)"
            )
        if v["type"] not in DIM_TYPES:
            raise ValueError(f"unknown type '{v['type']}'{did_you_mean(str(v['type']), DIM_TYPES)}; "
                             f"set type to one of {', '.join(DIM_TYPES)}")
        return v
    return {"type": "fixed", "value": v}


Dimension = Annotated[
    FixedDim | ChoiceDim | GridDim | UniformDim | LogUniformDim | RandIntDim | QUniformDim,
    Field(discriminator="type"),
    BeforeValidator(_as_dim),
]


def dim_values(dim: Any) -> list[Any]:
    """Representative values of a dimension (used to type-check it)."""
    if isinstance(dim, FixedDim):
        return [dim.value]
    if isinstance(dim, (ChoiceDim, GridDim)):
        return list(dim.values)
    return [dim.low, dim.high]
