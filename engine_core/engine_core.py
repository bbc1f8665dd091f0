"""EngineCore: the scheduler driving one Executor, step by step. Token ids in, token ids out.

Both the offline LLMEngine and the gRPC scheduler service are built on this class; the executor
may be in-process (LocalExecutor) or remote (services.executor_client.GrpcExecutor).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine_core.beam_search import BeamSearchParams, BeamSearchState
from engine_core.config import EngineConfig
from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import RequestOutputDelta, Scheduler, SchedulerStats
from engine_core.scheduler_output import SchedulerOutput
from engine_core.sequence_group import SequenceGroup, _Held, child_sampling_params
from engine_core.structured_output.compiler import GrammarCompiler
from engine_core.structured_output.request_grammar import RequestGrammar

logger = logging.getLogger(__name__)


@dataclass
class EngineCounters:
    """Monotonic totals, for metrics and throughput."""

    num_steps: int = 0  # steps whose results were applied
    steps_submitted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_added: int = 0
    executor_restarts: int = 0
    busy_time_s: float = 0.0
    # Speculative decoding (stay 0 while it is off; the metrics then leave the acceptance rate out).
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


class EngineCore:
    MAX_REPLAYS = 3

    def __init__(self, config: EngineConfig, executor: Executor, tokenizer: Any | None = None) -> None:
        self.config = config
        self.executor = executor
        self.info: ExecutorInfo = executor.describe()
        # The executor's geometry is authoritative (a remote executor may have resolved it).
        config.max_model_len = self.info.max_model_len
        config.block_size = self.info.block_size
        config.resolve_limits(self.info.max_model_len, self.info.device)
        self.scheduler = Scheduler(
            num_blocks=self.info.num_kv_blocks,
            block_size=self.info.block_size,
            max_model_len=self.info.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
            enable_prefix_caching=config.enable_prefix_caching,
            max_admission_delay_steps=config.resolve_admission_delay(self.info.device),
            long_prefill_token_threshold=config.long_prefill_token_threshold or 0,
        )
        self.counters = EngineCounters()
        self._pending: list[RequestOutputDelta] = []  # produced outside step() (aborts)
        self._consecutive_failures = 0
        # Steps submitted to the executor whose results were not taken yet, oldest first. With
        # async scheduling step N+1 is scheduled and sent while step N runs (as many as the
        # executor can overlap: 2 in-process, 3 over gRPC).
        self._in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        self.max_in_flight = executor.max_concurrent_batches if config.async_scheduling else 1
        # Structured output needs the tokenizer's vocabulary; built on first use.
        self.tokenizer = tokenizer
        self._grammar_compiler: GrammarCompiler | None = None

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # ------------------------------------------------------------------ requests
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Everything that makes a request unservable, as a ValueError naming the problem."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty: at least one token is required")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens, but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.info.vocab_size})")
        params.validate()
        params.validate_vocab(self.info.vocab_size)
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs {params.logprobs} exceeds max_logprobs {self.config.max_logprobs}")
        if params.n != 1:
            raise ValueError("EngineCore takes one sequence per request; fan out n>1 into child requests")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer, and this engine has none "
                             "(a dummy model, or a scheduler started without --tokenizer)")

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer, and this engine has none")
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.info.vocab_size,
                                                     list(self.info.eos_token_ids))
        return self._grammar_compiler

    def compile_grammar(self, params: SamplingParams) -> Any | None:
        """The compiled grammar of params' structured_outputs (cached; None without one). Thread-safe:
        the scheduler service calls it off the engine thread, so a compile never stalls a step."""
        if params.structured_outputs is None:
            return None
        return self.grammar_compiler.compile(params.structured_outputs)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, trace_context: dict[str, str] | None = None,
                    compiled_grammar: Any | None = None) -> Request:
        """compiled_grammar: from compile_grammar (done earlier, off the step thread); compiled here
        when the params have structured_outputs and none is given."""
        req = self._make_request(request_id, prompt_token_ids, params, arrival_time, trace_context, compiled_grammar)
        self.scheduler.add_request(req)
        self.counters.requests_added += 1
        return req

    def _make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      arrival_time: float | None = None, trace_context: dict[str, str] | None = None,
                      compiled_grammar: Any | None = None) -> Request:
        self.validate_request(prompt_token_ids, params)
        grammar = None
        if params.structured_outputs is not None:
            compiled = compiled_grammar if compiled_grammar is not None else self.compile_grammar(params)
            grammar = RequestGrammar(self.grammar_compiler.matcher(compiled), self.info.vocab_size)
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=tuple(self.info.eos_token_ids),
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            trace_context=trace_context,
            grammar=grammar,
        )
        return req

    # ------------------------------------------------------------------ sequence groups
    def add_generation(self, request_id: str, output_ids: list[str], prompt_token_ids: list[int],
                       params: SamplingParams, arrival_time: float | None = None,
                       trace_context: dict[str, str] | None = None, compiled_grammar: Any | None = None) -> list[Request]:
        """One client request, whatever its shape: a single sequence, n>1 / best_of samples or beam
        search (output_ids: one per returned sequence). Returns the requests to report metrics from."""
        if params.use_beam_search:
            if params.structured_outputs is not None:
                raise ValueError("beam search does not support structured output")
            self.add_beam_search(request_id, output_ids, prompt_token_ids, params.beam_search_params(),
                                 arrival_time, trace_context, stop_token_ids=params.stop_token_ids)
            group = self.scheduler.groups.by_output_id[output_ids[0]]
            return [self.scheduler.groups._carrier(group, oid) for oid in output_ids]
        if params.n > 1 or (params.best_of or 1) > params.n:
            children = self.add_parallel_sampling(request_id, output_ids, prompt_token_ids, params, arrival_time,
                                                  trace_context, compiled_grammar)
            return children[: len(output_ids)]
        return [self.add_request(output_ids[0], prompt_token_ids, params, arrival_time, trace_context,
                                 compiled_grammar)]

    def add_parallel_sampling(self, group_id: str, output_ids: list[str], prompt_token_ids: list[int],
                              params: SamplingParams, arrival_time: float | None = None,
                              trace_context: dict[str, str] | None = None,
                              compiled_grammar: Any | None = None) -> list[Request]:
        """n > 1 / best_of: the prompt is prefilled once and the samples fork its block table
        (engine_core/sequence_group.py). All or nothing: a bad child rejects the whole request."""
        if len(output_ids) != params.n:
            raise ValueError(f"{len(output_ids)} output ids for n={params.n}")
        num = params.best_of or params.n
        best_of = num > params.n
        ids = [f"{group_id}~b{i}" for i in range(num)] if best_of else list(output_ids)
        taken = [i for i in ids + output_ids if i in self.scheduler.requests or i in self.scheduler.groups.by_output_id]
        if taken:
            raise ValueError(f"request_id {taken[0]!r} is already in use")
        if best_of and params.structured_outputs is not None:
            raise ValueError("best_of does not support structured output")
        at = arrival_time if arrival_time is not None else time.monotonic()
        children = [self._make_request(cid, prompt_token_ids, child_sampling_params(params, i), at, trace_context,
                                       compiled_grammar) for i, cid in enumerate(ids)]
        group = SequenceGroup(group_id, list(output_ids), list(prompt_token_ids), params, arrival_time=at,
                              held={c.request_id: _Held() for c in children} if best_of else {})
        prefill = None
        if len(prompt_token_ids) > 1:
            prefill = Request(f"{group_id}~prefill", list(prompt_token_ids[:-1]),
                              SamplingParams(temperature=0.0, max_tokens=1), arrival_time=at,
                              trace_context=trace_context)
        self.scheduler.groups.add_parallel(self.scheduler, group, children, prefill)
        self.counters.requests_added += len(children)
        return children

    def beam_eos_ids(self, stop_token_ids: list[int] | None = None) -> tuple[int, ...]:
        """Tokens that end a beam: the model's EOS and the request's stop token ids (HF: eos_token_id list)."""
        eos = list(self.info.eos_token_ids)
        return tuple(eos + [t for t in stop_token_ids or () if t not in eos])

    def validate_beam_search(self, prompt_token_ids: list[int], params: BeamSearchParams,
                             eos: tuple[int, ...] = ()) -> SamplingParams:
        keep = params.beams_to_keep(len(eos))
        limit = min(self.config.max_logprobs, 20)
        if keep > limit:  # each beam returns its top `keep` logprobs per step
            raise ValueError(f"beam_width {params.beam_width} needs the top {keep} logprobs per step, over this "
                             f"engine's max_logprobs {limit}: use beam_width <= {limit // (keep // params.beam_width)}")
        if params.beam_width > self.config.max_num_seqs:
            raise ValueError(f"beam_width {params.beam_width} exceeds max_num_seqs {self.config.max_num_seqs}")
        beam_params = params.beam_sampling_params(len(eos))
        self.validate_request(prompt_token_ids, beam_params)
        return beam_params

    def add_beam_search(self, group_id: str, output_ids: list[str], prompt_token_ids: list[int],
                        params: BeamSearchParams, arrival_time: float | None = None,
                        trace_context: dict[str, str] | None = None, stop_token_ids: list[int] | None = None) -> None:
        """Beam search on forked block tables; outputs (best first) come under output_ids when the
        search ends (engine_core/beam_search.py has HF's rules)."""
        if len(output_ids) != params.beam_width:
            raise ValueError(f"{len(output_ids)} output ids for beam_width={params.beam_width}")
        taken = [i for i in output_ids if i in self.scheduler.requests or i in self.scheduler.groups.by_output_id]
        if taken:
            raise ValueError(f"request_id {taken[0]!r} is already in use")
        eos = self.beam_eos_ids(stop_token_ids)
        beam_params = self.validate_beam_search(prompt_token_ids, params, eos)
        at = arrival_time if arrival_time is not None else time.monotonic()
        group = SequenceGroup(group_id, list(output_ids), list(prompt_token_ids), beam_params, arrival_time=at,
                              beam=BeamSearchState(params, eos),
                              beam_params=beam_params, max_model_len=self.max_model_len)
        first = self._make_request(group.next_id(), prompt_token_ids, beam_params, at, trace_context)
        self.scheduler.groups.add_beam_search(self.scheduler, group, first)
        self.counters.requests_added += 1

    def abort_requests(self, request_ids: list[str]) -> None:
        for req in self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED):
            self._pending.append(self.scheduler.abort_delta(req))

    def finish_requests(self, request_ids: list[str], stop_reason: int | str | None = None) -> None:
        """Stop requests that finished outside the scheduler's view (a stop string was detokenized)."""
        for req in self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_STOPPED, stop_reason):
            self._pending.append(self.scheduler.abort_delta(req))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending) or bool(self._in_flight)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutputDelta]:
        """Advance the engine by one step; return what requests produced.

        Synchronous (max_in_flight 1): schedule, execute, apply. Async (2): schedule and submit
        step N+1 first, then wait for step N's result and apply it, so the host's scheduling and
        input preparation run while the device computes (vLLM's batch queue). The first call of a
        burst only submits (and returns nothing) so that the next one can overlap.
        """
        deltas, self._pending = self._pending, []
        submitted = False
        max_in_flight = self._max_in_flight_now()
        if len(self._in_flight) < max_in_flight and self.scheduler.has_unfinished_requests():
            so = self.scheduler.schedule()
            if not so.is_empty or so.finished_req_ids:
                if so.grammar_req_ids:
                    if self._in_flight:  # the previous token is still being sampled: bitmasks follow
                        so.bitmasks_deferred = True
                    else:
                        so.grammar_bitmasks = self.scheduler.fill_grammar_bitmasks(so.grammar_req_ids)
                try:
                    self.executor.submit(so)
                except ExecutorError as e:
                    self._fail_in_flight(e)
                    return deltas
                self._in_flight.append((so, time.perf_counter()))
                self.counters.steps_submitted += 1
                submitted = True
        if not self._in_flight:
            return deltas
        if submitted and len(self._in_flight) < max_in_flight:
            return deltas  # come back to schedule the next step while this one runs
        so, t0 = self._in_flight.popleft()
        try:
            result = self.executor.get_result()
        except ExecutorError as e:
            self._fail_in_flight(e)
            return deltas
        self._consecutive_failures = 0
        self.counters.busy_time_s += time.perf_counter() - t0
        if so.is_empty:
            self._provide_deferred_bitmasks()
            return deltas  # only told the executor to drop finished requests
        self.counters.num_steps += 1
        new = self.scheduler.update_from_output(so, result)
        for d in new:
            self.counters.generation_tokens += len(d.new_token_ids)
            if d.num_output_tokens == len(d.new_token_ids):  # first tokens of this request
                self.counters.prompt_tokens += d.num_prompt_tokens
        self._provide_deferred_bitmasks()
        return deltas + new

    def _max_in_flight_now(self) -> int:
        """Deferred bitmasks are filled once the one step before theirs has returned, so at most
        two steps are in flight while structured-output requests run (one if the executor cannot
        take bitmasks after the step)."""
        if not self.scheduler.has_grammar_requests:
            return self.max_in_flight
        return min(self.max_in_flight, 2 if self.executor.supports_deferred_bitmasks else 1)

    def _provide_deferred_bitmasks(self) -> None:
        """The oldest step in flight waits for its bitmasks, and every earlier result is applied
        now: fill them from the matchers and hand them over (the executor then samples)."""
        if not self._in_flight:
            return
        nxt = self._in_flight[0][0]
        if not nxt.bitmasks_deferred:
            return
        nxt.bitmasks_deferred = False
        nxt.grammar_bitmasks = self.scheduler.fill_grammar_bitmasks(nxt.grammar_req_ids)
        try:
            self.executor.provide_bitmasks(nxt.step_id, nxt.grammar_bitmasks)
        except ExecutorError as e:
            self._fail_in_flight(e)

    def _fail_in_flight(self, error: ExecutorError) -> None:
        """A step failed: every step still in flight is lost with it; replay from tokens."""
        self._in_flight.clear()
        self.executor.abandon_in_flight()
        self._recover(error)

    def _recover(self, error: Exception) -> None:
        """The executor failed mid-step: reset it and replay every unfinished request from its
        tokens (prompt + generated so far). Nothing in flight is lost."""
        self.counters.executor_restarts += 1
        self._consecutive_failures += 1
        if self._consecutive_failures > self.MAX_REPLAYS:  # failing every time: give up loudly
            raise error
        logger.warning("executor failed (%s); replaying %d requests", error, self.scheduler.num_unfinished)
        self.executor.reset()
        self.scheduler.requests_for_replay()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        self.executor.shutdown()
