"""Admission order across tenants: FCFS, or the Virtual Token Counter (VTC).

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024): each tenant has a
counter of the service it received, ``sum(w_in * input_tokens + w_out * output_tokens) / weight``.
Admission always serves the backlogged tenant with the smallest counter (FCFS within a tenant), and
a tenant that becomes active is lifted to the smallest counter among active tenants, so idling
earns no credit. With one active tenant the order is exactly FCFS.

    while capacity:
        t = argmin(counter[t] for t in backlogged tenants)
        admit head(queue[t]); counter[t] += w_in * prompt_tokens / weight[t]
    every step: counter[t] += w_out * decoded_tokens / weight[t]
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator

from .request import Request

INPUT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


class FcfsOrder:
    def candidates(self, waiting: Iterable[Request]) -> Iterator[Request]:
        return iter(list(waiting))

    def refresh(self, waiting: Iterable[Request], running: Iterable[Request]) -> None:
        pass

    def charge(self, request: Request, num_tokens: int) -> None:
        pass

    def charge_all(self, charges: Iterable[tuple[Request, int]]) -> None:
        pass

    def charge_decodes(self, tenants: Iterable[str]) -> None:
        pass


class VirtualTokenCounter:
    def __init__(self, weight_of: Callable[[str], float] = lambda tenant: 1.0):
        self.weight_of = weight_of
        self.counters: dict[str, float] = {}
        self._active: set[str] = set()

    def refresh(self, waiting: Iterable[Request], running: Iterable[Request]) -> None:
        """Lift newly active tenants to the smallest counter of those already active."""
        tenants = {r.tenant for r in waiting} | {r.tenant for r in running}
        still = tenants & self._active
        floor = min((self.counters.get(t, 0.0) for t in still), default=None)
        if floor is None:
            floor = min(self.counters.values(), default=0.0)
        for tenant in tenants - self._active:
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._active = tenants

    def candidates(self, waiting: Iterable[Request]) -> Iterator[Request]:
        """Waiting requests in VTC order (counters are read live, so charges between picks count)."""
        queues: OrderedDict[str, deque[Request]] = OrderedDict()
        for request in waiting:
            queues.setdefault(request.tenant, deque()).append(request)
        while queues:
            tenant = min(queues, key=lambda t: self.counters.get(t, 0.0))  # ties: first in queue order
            queue = queues[tenant]
            yield queue.popleft()
            if not queue:
                del queues[tenant]

    def charge(self, request: Request, num_tokens: int) -> None:
        """Service for ``num_tokens`` computed this step."""
        self.charge_all(((request, num_tokens),))

    def charge_all(self, charges: Iterable[tuple[Request, int]]) -> None:
        """Service for each (request, tokens computed this step): prompt tokens at the input
        weight, the rest (decodes) at the output weight; each tenant's weight read once."""
        cost: dict[str, float] = {}
        for request, num_tokens in charges:
            prompt_part = max(0, min(num_tokens, len(request.prompt_token_ids) - request.num_computed_tokens))
            cost[request.tenant] = (cost.get(request.tenant, 0.0) + INPUT_WEIGHT * prompt_part
                                    + OUTPUT_WEIGHT * (num_tokens - prompt_part))
        self._add(cost)

    def charge_decodes(self, tenants: Iterable[str]) -> None:
        """One output token for each tenant named (once per decoding request): the common step,
        tallied in C rather than request by request."""
        self._add({tenant: OUTPUT_WEIGHT * n for tenant, n in Counter(tenants).items()})

    def _add(self, cost: dict[str, float]) -> None:
        for tenant, total in cost.items():
            self.counters[tenant] = self.counters.get(tenant, 0.0) + total / self.weight_of(tenant)
