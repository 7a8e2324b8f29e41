"""What a running group tells the driver: a member's epoch, a member's end, the group's end.

Within a process these travel as the dataclasses below; through Ray Tune, which carries only
dicts of results, as :meth:`to_result`'s dict, turned back by :func:`from_result`. Both ends
use these two functions, so no consumer recognises an event by its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlpgrid.grid import metrics

_KIND = "event"  # the key that names an event's kind in a Tune result
_MEMBER = "member"  # the grid trial an event is about (Tune fills "trial_id" with its own)
_PER_EPOCH = {*metrics.PER_EPOCH, *metrics.ATTEMPT}


@dataclass(frozen=True)
class EpochEnded:
    """A member finished an epoch: its metrics as MLflow records them."""

    trial_id: str
    metrics: dict[str, Any]

    def to_result(self) -> dict[str, Any]:
        return {**self.metrics, _KIND: "epoch", _MEMBER: self.trial_id}


@dataclass(frozen=True)
class TrialEnded:
    """A member ended (finished, diverged, failed, or left to another process)."""

    trial_id: str
    status: str

    def to_result(self) -> dict[str, Any]:
        return {_KIND: "ended", _MEMBER: self.trial_id, "status": self.status}


@dataclass(frozen=True)
class GroupEnded:
    """The group's worker is done: every member's status."""

    statuses: dict[str, str]

    def to_result(self) -> dict[str, Any]:
        return {_KIND: "group", "statuses": self.statuses}


Event = EpochEnded | TrialEnded | GroupEnded
Listener = Callable[[Event], None]


def from_result(result: dict[str, Any]) -> Event | None:
    """The event a Tune result carries; None for a result that is none of ours (Tune's own)."""
    kind = result.get(_KIND)
    if kind == "epoch":
        values = {k: v for k, v in result.items() if k in _PER_EPOCH}  # not the fields Tune adds
        return EpochEnded(result[_MEMBER], values)
    if kind == "ended":
        return TrialEnded(result[_MEMBER], result["status"])
    if kind == "group":
        return GroupEnded(dict(result["statuses"]))
    return None
