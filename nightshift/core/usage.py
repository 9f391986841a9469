"""What serving cost: requests sent, retries, tokens, an estimated price, and a budget.

A :class:`Usage` is a bag of counters. The HTTP backend keeps one for its whole life (the
run's total, failed batches included: their calls were paid too) and fills another per
``generate`` call when asked (a batch's share). Prices are per million tokens, per model,
from the serving config (:class:`TokenPrice`).

Example::

    usage = Usage()
    usage.add_answer(prompt_tokens=120, completion_tokens=30)
    usage.cost_usd(TokenPrice(input_per_1m=0.15, output_per_1m=0.60))   # 3.6e-05

Tokens answered through a provider's batch API (``mode: batch``) are also counted in
``batch_prompt_tokens`` / ``batch_completion_tokens`` and cost ``1 - batch_discount`` of
the online price; :meth:`Usage.online_cost_usd` is what the same tokens cost online.

A :class:`Budget` caps what one run may spend: a caller reserves the projected cost of
the requests it is about to send (:meth:`Budget.reserve`), and settles it with what they
cost once answered (:meth:`Budget.settle`); a reservation that would pass the cap is
refused, so the run stops sending before it overspends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

__all__ = ["Budget", "TokenPrice", "Usage"]

#: A number (an integer or a float), never a boolean or a string (as core.validation's).
_Number = Annotated[float, Strict()]


class TokenPrice(BaseModel):
    """US dollars per million prompt (input) and completion (output) tokens, and the
    share a provider's batch API takes off (``batch_discount: 0.5``: half price)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: _Number = Field(default=0.0, ge=0)
    output_per_1m: _Number = Field(default=0.0, ge=0)
    batch_discount: _Number = Field(default=0.5, ge=0, lt=1)

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """What these tokens cost online, or through the batch API (``batch``)."""
        online = (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6
        return online * (1 - self.batch_discount) if batch else online


@dataclass
class Usage:
    """Counters of one backend or one call; ``merge`` adds another's."""

    requests: int = 0  #: HTTP attempts sent (first tries and retries)
    retries: int = 0  #: attempts after the first, for any row
    answered: int = 0  #: rows that got an answer
    failed: int = 0  #: rows whose final outcome was an error
    prompt_tokens: int = 0  #: as reported by the server, answered rows
    completion_tokens: int = 0
    cached: int = 0  #: rows answered from the batch's answer cache (no request)
    #: of the tokens above, those answered through a provider batch API (discounted)
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  #: failed attempts by kind

    def add_answer(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> None:
        self.answered += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if batch:
            self.batch_prompt_tokens += prompt_tokens
            self.batch_completion_tokens += completion_tokens

    def add_status(self, kind: str) -> None:
        self.statuses[kind] = self.statuses.get(kind, 0) + 1

    def merge(self, other: Usage) -> None:
        for f in fields(self):
            if f.name == "statuses":
                for kind, n in other.statuses.items():
                    self.statuses[kind] = self.statuses.get(kind, 0) + n
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def cost_usd(self, price: TokenPrice | None) -> float:
        """The estimated cost: online tokens at the online price, batch tokens discounted."""
        if price is None:
            return 0.0
        online_p = self.prompt_tokens - self.batch_prompt_tokens
        online_c = self.completion_tokens - self.batch_completion_tokens
        return price.cost(online_p, online_c) + price.cost(
            self.batch_prompt_tokens, self.batch_completion_tokens, batch=True
        )

    def online_cost_usd(self, price: TokenPrice | None) -> float:
        """What the same tokens would have cost through the online API."""
        return price.cost(self.prompt_tokens, self.completion_tokens) if price else 0.0

    def as_dict(self, price: TokenPrice | None = None) -> dict[str, float | int]:
        """Flat numbers (for BatchRef, summaries and artifacts)."""
        out: dict[str, float | int] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "statuses"
        }
        out["cost_usd"] = round(self.cost_usd(price), 6)
        out["online_cost_usd"] = round(self.online_cost_usd(price), 6)
        return out


class Budget:
    """What one run may spend (US dollars), shared by its tasks (thread-safe).

    ``reserve(projected)`` before sending requests: True if ``spent + reserved +
    projected`` stays within the cap, and the amount is then held; a reservation that
    does not fit waits while other reservations are outstanding (they may settle lower),
    then is refused, and from then on the budget is :attr:`exhausted` (the run sends
    nothing new). ``settle(projected, actual)`` replaces a reservation by what the
    requests cost; :meth:`hold` keeps it aside for requests waiting in provider batches
    (they will be paid) until the unit comes back for them (:meth:`take_held`).

    Example::

        budget = Budget(5.0)
        if budget.reserve(0.8):
            ...  # send, then
            budget.settle(0.8, 0.61)
    """

    def __init__(self, cap_usd: float) -> None:
        self.cap_usd = cap_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self.exhausted = False
        #: what the first refused reservation asked for (how far the run was from its cap)
        self.refused_usd: float | None = None
        #: projections of requests in provider batches still pending, by unit: they will
        #: be paid (:meth:`hold`, :meth:`take_held`)
        self.held: dict[str, float] = {}
        self._cond = threading.Condition()

    def _committed(self) -> float:
        return self.spent_usd + self.reserved_usd + sum(self.held.values())

    def reserve(self, projected_usd: float) -> bool:
        with self._cond:
            while True:
                if self.exhausted:
                    return False
                if self._committed() + projected_usd <= self.cap_usd + 1e-12:
                    self.reserved_usd += projected_usd
                    return True
                if self.reserved_usd <= 1e-12:
                    self.exhausted = True
                    self.refused_usd = projected_usd
                    self._cond.notify_all()
                    return False
                self._cond.wait(timeout=5.0)

    def settle(self, projected_usd: float, actual_usd: float | None) -> None:
        with self._cond:
            self.reserved_usd = max(self.reserved_usd - projected_usd, 0.0)
            self.spent_usd += projected_usd if actual_usd is None else actual_usd
            self._cond.notify_all()

    def hold(self, key: str, projected_usd: float) -> None:
        """A reservation whose requests wait in provider batches: kept, under ``key``,
        until :meth:`take_held` (they will be paid; nothing else may use it)."""
        with self._cond:
            self.reserved_usd = max(self.reserved_usd - projected_usd, 0.0)
            self.held[key] = self.held.get(key, 0.0) + projected_usd
            self._cond.notify_all()

    def take_held(self, key: str) -> float:
        """What :meth:`hold` kept under ``key``, reserved again for the caller (0: none)."""
        with self._cond:
            amount = self.held.pop(key, 0.0)
            self.reserved_usd += amount
            return amount

    @property
    def left_usd(self) -> float:
        with self._cond:
            return max(self.cap_usd - self._committed(), 0.0)
