"""What a run spends, and the caps it stops at (--max-calls, --max-cost).

Every call of a run goes through `MeteredEndpoint.ask`, which reserves the call before it is
sent and counts it once answered: one call and its estimated cost (the prompt's tokens as last
billed, else about four bytes a token, plus one completion token, at the model's price). A call
that would carry the reserved total past a cap is not sent (`BudgetReached`), so calls in flight
never overshoot a cap; once an answer arrives its reservation is replaced by what was billed.
An ask the endpoint answers from rows an earlier request returned (`Endpoint.holds_answer`:
vLLM's prompt_logprobs) sends nothing, so it is neither reserved nor capped, and counts
`Answer.requests`, 0.
The totals include what the checkpoint already spent, so the same command with a higher
cap resumes where the lower one stopped.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from logprob_cli.endpoints import Answer, AskFunction, Endpoint, Prompt, Query, WrappingEndpoint
from logprob_cli.errors import LogprobError, Worded
from logprob_cli.run._prices import Price


@dataclass
class Spend:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def minus(self, other: "Spend") -> "Spend":
        return Spend(
            self.calls - other.calls,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
        )

    def plus(self, other: "Spend") -> "Spend":
        return Spend(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


class BudgetReached(LogprobError):
    """The next call would cross max_calls or max_cost; the message says which and how far. A run stops cleanly
    and reports it (RunSummary.budget_reached); the CLI exits 3."""


class MeteredEndpoint(WrappingEndpoint):
    """`endpoint` with every call counted into `spent` and checked against the caps (see module docstring).

    Every other member of the contract is the wrapped endpoint's (WrappingEndpoint); `verify_mapping` spends
    its calls through this meter.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        spent: Spend,
        price: Price | None,
        max_calls: int | None = None,
        max_cost: float | None = None,
    ):
        if max_cost is not None and price is None:
            raise ValueError(Worded("{max_cost} needs the model's price: give {price} PROMPT,COMPLETION (US$ per 1M tokens)"))
        super().__init__(endpoint)
        self.spent = spent
        self.price = price
        self.max_calls = max_calls
        self.max_cost = max_cost
        self._reserved_calls = 0
        self._reserved_cost = 0.0
        self._prompt_tokens: dict[Any, int] = {}
        self._in_flight: set[asyncio.Future] = set()  # one per reserved call being sent

    async def verify_mapping(self, prompt: Prompt, ask: AskFunction | None = None) -> str | None:
        """The wrapped endpoint's check, its calls spent through this meter (counted and capped)."""
        return await self.endpoint.verify_mapping(prompt, ask or self.ask)

    def cost(self) -> float | None:
        """US$ spent so far (None when the price is unknown)."""
        return None if self.price is None else self.price.cost(self.spent.prompt_tokens, self.spent.completion_tokens)

    async def ask(self, prompt: Prompt, query: Query) -> Answer:
        estimate = await self._reservation(prompt, query)
        if estimate is None:  # read from rows an earlier request returned: nothing is sent
            answer = await self.endpoint.ask(prompt, query)
        else:
            sent = asyncio.get_running_loop().create_future()
            self._in_flight.add(sent)
            try:
                answer = await self.endpoint.ask(prompt, query)
            finally:
                self._reserved_calls -= 1
                self._reserved_cost -= estimate
                self._in_flight.discard(sent)
                sent.set_result(None)
        if answer.prompt_tokens:
            self._prompt_tokens[prompt.id] = answer.prompt_tokens
        self.spent.calls += answer.requests
        self.spent.prompt_tokens += answer.prompt_tokens
        self.spent.completion_tokens += answer.completion_tokens
        return answer

    async def _reservation(self, prompt: Prompt, query: Query) -> float | None:
        """The estimated cost reserved for this ask, None where the endpoint holds its answer (nothing to reserve).
        At a cap, an endpoint whose requests answer several positions (`positions_per_call`) waits for the calls in
        flight first: one of them may bring the rows this ask reads (a pass asked by another position)."""
        while True:
            if self.endpoint.holds_answer(prompt, query):
                return None
            estimate = self._estimate(prompt, query)
            try:
                self._reserve(estimate)
                return estimate
            except BudgetReached:
                if self.endpoint.positions_per_call == 1 or not self._in_flight:
                    raise
                await asyncio.wait(set(self._in_flight))

    def _estimate(self, prompt: Prompt, query: Query) -> float:
        """The most this ask may cost: its prompt tokens (as billed before, else ~4 bytes a token) and one completion
        token a choice it draws (`Query.draws`: up to 128 on OpenAI)."""
        if self.price is None:
            return 0.0
        tokens = self._prompt_tokens.get(prompt.id)
        if tokens is None:
            tokens = max(1, len(json.dumps(prompt.content(), ensure_ascii=False).encode()) // 4)
        return self.price.cost(tokens, max(1, query.draws))

    def _reserve(self, estimate: float) -> None:
        if self.max_calls is not None and self.spent.calls + self._reserved_calls + 1 > self.max_calls:
            raise BudgetReached(Worded("{max_calls} {cap:,} reached", cap=self.max_calls))
        cost = self.cost()
        if self.max_cost is not None and cost is not None and cost + self._reserved_cost + estimate > self.max_cost:
            raise BudgetReached(Worded("{max_cost} ${cap:,.4f} reached", cap=self.max_cost))
        self._reserved_calls += 1
        self._reserved_cost += estimate
