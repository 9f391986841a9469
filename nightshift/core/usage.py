"""What serving cost: requests sent, retries, tokens and an estimated price.

A :class:`Usage` is a bag of counters. The HTTP backend keeps one for its whole life (the
run's total, failed batches included: their calls were paid too) and fills another per
``generate`` call when asked (a batch's share). Prices are per million tokens, per model,
from the serving config (:class:`TokenPrice`).

Example::

    usage = Usage()
    usage.add_answer(prompt_tokens=120, completion_tokens=30)
    usage.cost_usd(TokenPrice(input_per_1m=0.15, output_per_1m=0.60))   # 3.6e-05
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TokenPrice", "Usage"]


class TokenPrice(BaseModel):
    """US dollars per million prompt (input) and completion (output) tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: float = Field(default=0.0, ge=0)
    output_per_1m: float = Field(default=0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


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
    statuses: dict[str, int] = field(default_factory=dict)  #: failed attempts by kind

    def add_answer(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.answered += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

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
        return price.cost(self.prompt_tokens, self.completion_tokens) if price else 0.0

    def as_dict(self, price: TokenPrice | None = None) -> dict[str, float | int]:
        """Flat numbers (for BatchRef, summaries and artifacts)."""
        out: dict[str, float | int] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "statuses"
        }
        out["cost_usd"] = round(self.cost_usd(price), 6)
        return out
