"""A run folder's ``budget.json`` (what a ``budget_s`` run was sized to), read back by a resumed run.

The file sits in a run folder, which may come from anyone, so it is read as untrusted: a pydantic
schema (the fields the budget writes, nothing else) and bounds that follow from the resumed run's own
``budget_s``: its step count at most what that budget could buy at any plausible rate
(``MAX_STEPS_PER_S``, a step of 100 microseconds: the fastest net of this project on a
data-centre GPU takes over a millisecond). A file that breaks them is one line naming the file and
the fix; a missing or unreadable one is absent (the caller says what that means).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.plain import check_tree, invalid, read_json_object
from cifarkit.core.untrusted.text import shown

MAX_STEPS_PER_S = 10_000  # the most training steps a second of any run here could buy
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Scalar = int | float | str | bool
NetOptions = Annotated[dict[Annotated[str, Field(max_length=100)], Scalar | list[Scalar]], Field(min_length=1)]


class RecordedBudget(BaseModel):
    """budget.json as cifarkit/run/budget.py writes it: the net (with a ladder), the comparison of the
    candidates, and once the run has timed its first steps, the step count it fixed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seconds: Seconds
    net: NetOptions | None = Field(default=None)  # absent: the configured net; given, never null
    required_epochs: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    candidates: Annotated[list[dict[str, Any]], Field(max_length=100)] | None = None
    compare_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    fixed_steps: Annotated[int, Field(ge=1)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    seconds_per_step: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    decided_at_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @field_validator("net", mode="before")
    @classmethod
    def _not_null(cls, net: Any) -> Any:
        if net is None:
            raise ValueError("null (a budget without a ladder leaves it out)")
        return net


def max_steps(budget_s: float) -> int:
    """The most steps ``budget_s`` seconds could buy at any plausible rate."""
    return math.ceil(budget_s * MAX_STEPS_PER_S)


def read_budget(path: Path, budget_s: float) -> dict[str, Any] | None:
    """``path``'s recorded decision, checked, as the budget wrote it (None: no file, or not a JSON
    object); a resumed run with ``budget_s`` trains at most what that budget could buy."""
    data = read_json_object(path)
    if data is None:
        return None
    fix = "delete it to start a new run, or resume with the run's replay overrides from its log instead of budget_s"
    check_tree(data, f"{shown(str(path))}", fix, max_depth=6, max_nodes=10_000)
    try:
        recorded = RecordedBudget.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{shown(str(path))} is not a budget this project wrote ({invalid(e)}); {fix}") from None
    most = max_steps(budget_s)
    for name in ("steps", "fixed_steps"):
        value = getattr(recorded, name)
        if value is not None and value > most:
            raise UserError(
                f"{shown(str(path))} says {name}={value}, more than budget_s={budget_s:g} could buy (at most {most} "
                f"steps, {MAX_STEPS_PER_S} a second); {fix}"
            )
    if recorded.fixed_steps is not None and recorded.steps is not None and recorded.fixed_steps > recorded.steps:
        raise UserError(
            f"{shown(str(path))} says fixed_steps={recorded.fixed_steps}, more than its steps={recorded.steps}; {fix}"
        )
    return recorded.model_dump(exclude_none=True)
