"""Find the requests that make a step fail: re-run the failed step's rows in halves.

A forward that raises (CUDA OOM, a kernel error, a NaN guard) is retried on each half of its
rows; a half that fails again is halved again, down to single rows. Each row is computed at most
once successfully, and a step of n rows costs at most 2n - 2 re-runs. Pure Python: ``run`` is the
caller's forward on a subset of the step's rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def bisect_failures(items: Sequence[Item], run: Callable[[list[Item]], Result]
                    ) -> tuple[list[tuple[list[Item], Result]], list[tuple[Item, Exception]]]:
    """``items`` failed together: returns the groups that then ran (with results) and the single
    items that failed alone (with their errors)."""
    succeeded: list[tuple[list[Item], Result]] = []
    culprits: list[tuple[Item, Exception]] = []
    pending: deque[list[Item]] = deque(_halves(list(items)))
    while pending:
        group = pending.popleft()
        try:
            succeeded.append((group, run(group)))
        except Exception as exc:  # noqa: BLE001 - the caller ends the culprit with this error
            if len(group) == 1:
                culprits.append((group[0], exc))
            else:
                pending.extend(_halves(group))
    return succeeded, culprits


def _halves(group: list[Item]) -> list[list[Item]]:
    if len(group) <= 1:
        return [group] if group else []
    middle = len(group) // 2
    return [group[:middle], group[middle:]]
