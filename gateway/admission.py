"""Fair, bounded admission of one request's prompts (issue 16, finding 1): no single request may
take the tokenizer service (or the scheduler's queue) away from everybody else.

- at most `max_prompts` prompts per completions request (400 beyond: checked before any work);
- a prompt string longer than `chars_per_token_bound` x max_model_len characters cannot fit the
  context whatever it tokenizes to (no vocabulary token of the served models is that long), so it
  gets the context-length 400 without costing tokenizer CPU (a 10 MB prompt used to burn ~20 s);
- the prompts of one request are tokenized in batches of `tokenize_batch` (one EncodeBatch call
  each), `tokenize_concurrency` batches at a time (not all at once), and every request of the worker
  shares `worker_tokenize_slots` in-flight tokenizer calls (FIFO), so a request with many prompts
  waits its turn instead of flooding the tokenizer service;
- the total prompt tokens of one request are capped (`max_request_prompt_tokens`): tokenization
  stops at the first prompt past the cap (400);
- a request whose samples (prompts x n) exceed what the scheduler can ever hold (its queue plus
  its running slots) is a 400, not a 429 that no retry can turn into a success (finding 5).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.errors import bad_request, context_length_exceeded

T = TypeVar("T")


@dataclass(frozen=True)
class AdmissionLimits:
    max_prompts: int = 256
    max_request_prompt_tokens: int = 1 << 20
    tokenize_concurrency: int = 4
    tokenize_batch: int = 16
    worker_tokenize_slots: int = 64
    # Longest token of SmolLM2 / Llama-3 / Qwen3 vocabularies is < 128 chars (runs of spaces / dashes).
    chars_per_token_bound: int = 128


class Admission:
    """One per gateway worker (holds the worker-wide tokenizer slots); create inside the loop."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._slots: asyncio.Semaphore | None = None

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.worker_tokenize_slots)
        return self._slots

    def check_prompt_count(self, num_prompts: int) -> None:
        cap = self.limits.max_prompts
        if num_prompts > cap:
            raise bad_request(f"Too many prompts in one request: {num_prompts} (the limit is {cap}); split it "
                              "into several requests.", param="prompt", code="too_many_prompts")

    def check_text_size(self, chars: int, max_model_len: int, param: str, what: str = "prompt") -> None:
        """Reject, without tokenizing, text that cannot fit max_model_len tokens whatever it encodes to."""
        if max_model_len > 0 and chars > self.limits.chars_per_token_bound * max_model_len:
            err = context_length_exceeded(max_model_len, chars // self.limits.chars_per_token_bound, None, what)
            err.message = (f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                           f"has {chars} characters, which is more than that many tokens can hold. Please reduce "
                           f"the length of the {what}.")
            err.param = param
            raise err

    @staticmethod
    def check_capacity(samples: int, capacity: int, n: int) -> None:
        """samples = prompts x n; capacity = queue length + running slots (0: unlimited)."""
        if capacity > 0 and samples > capacity:
            raise bad_request(f"This request asks for {samples} samples (prompts x n = {samples // max(n, 1)} x {n}), "
                              f"more than the server can ever hold at once ({capacity}); send fewer prompts or a "
                              f"smaller n.", param="n", code="request_too_large")

    async def tokenize_all(self, items: Sequence[T],
                           tokenize: Callable[[list[int]], Awaitable[list[tuple[list[int], str]]]]
                           ) -> list[tuple[list[int], str]]:
        """tokenize(indices) -> (ids, text) for those items, over batches of `tokenize_batch` items,
        `tokenize_concurrency` batches at a time, each call holding one of the worker's tokenizer
        slots; stops (400) once the prompts' tokens pass the request cap."""
        limits = self.limits
        batches = [list(range(i, min(i + limits.tokenize_batch, len(items))))
                   for i in range(0, len(items), limits.tokenize_batch)]
        results: list[tuple[list[int], str] | None] = [None] * len(items)
        total = 0
        error: list[BaseException] = []

        async def worker() -> None:
            nonlocal total
            while not error and batches:
                batch = batches.pop(0)
                async with self.slots:
                    if error:
                        return
                    try:
                        out = await tokenize(batch)
                    except Exception as e:  # noqa: BLE001 (re-raised below: the first one wins)
                        error.append(e)
                        return
                for i, r in zip(batch, out):
                    results[i] = r
                    total += len(r[0])
                if total > limits.max_request_prompt_tokens:
                    error.append(bad_request(
                        f"The prompts of this request have more than {limits.max_request_prompt_tokens} tokens in "
                        "all; split it into several requests.", param="prompt", code="request_too_large"))
                    return

        await asyncio.gather(*(worker() for _ in range(min(limits.tokenize_concurrency, len(batches)) or 1)))
        if error:
            raise error[0]
        return results  # type: ignore[return-value]
