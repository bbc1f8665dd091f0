"""EngineCore: the scheduler driving one Executor, step by step. Token ids in, token ids out.

Both the offline LLMEngine and the gRPC scheduler service are built on this class; the executor
may be in-process (LocalExecutor) or remote (services.executor_client.GrpcExecutor).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine_core.beam_search import BeamSearchParams, BeamSearchState
from engine_core.config import EngineConfig
from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from engine_core.request import Request, RequestStatus
from engine_core.request_deadlines import RequestDeadlines
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
    requests_timed_out: int = 0  # aborted at their deadline (also counted as finish reason "abort")
    spec_decode_num_drafts: int = 0  # verifications (requests x steps with >= 1 draft token)
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def observe_spec_decode(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.spec_decode_num_drafts += 1
        self.spec_decode_num_draft_tokens += num_draft_tokens
        self.spec_decode_num_accepted_tokens += num_accepted
        per_pos = self.spec_decode_num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for j in range(num_accepted):
            per_pos[j] += 1


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
            scheduling_policy=config.scheduling_policy,
            num_lookahead_slots=self.info.num_speculative_tokens and self.info.num_lookahead_slots,
        )
        spec = config.speculative_config
        if spec is not None and spec.num_speculative_tokens != self.info.num_speculative_tokens:
            raise ValueError(f"speculative_config asks for {spec.num_speculative_tokens} speculative tokens, the "
                             f"executor is configured for {self.info.num_speculative_tokens}: give the executor "
                             "the same --speculative-config")
        self.counters = EngineCounters()
        self._pending: list[RequestOutputDelta] = []  # produced outside step() (aborts)
        self._consecutive_failures = 0
        # Steps submitted to the executor whose results were not taken yet, oldest first. With
        # async scheduling step N+1 is scheduled and sent while step N runs (as many as the
        # executor can overlap: 2 in-process, 3 over gRPC).
        self._in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        self.max_in_flight = executor.max_concurrent_batches if config.async_scheduling else 1
        if self.info.num_speculative_tokens:
            # Speculative decoding runs one step at a time: a step's drafts and its rollback need
            # the previous step's accepted tokens (docs/speculative_decoding.md).
            self.max_in_flight = 1
        # Structured output needs the tokenizer's vocabulary; built on first use.
        self.tokenizer = tokenizer
        self._grammar_compiler: GrammarCompiler | None = None
        # Per-request deadlines, checked once per step; the clock is replaceable (tests).
        self.deadlines = RequestDeadlines()
        self.clock = time.monotonic

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # ------------------------------------------------------------------ requests
    def validate_scheduling(self, priority: int = 0, timeout: float | None = None) -> None:
        """The request's priority and timeout, as a ValueError naming the field (vLLM rejects a
        priority under FCFS rather than silently ignoring it)."""
        if type(priority) is not int:  # bools and floats too: a ValueError like every request check
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy "
                             "(--scheduling-policy priority); this server schedules fcfs (priority must be 0)")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not 0 <= timeout < math.inf):
            raise ValueError(f"timeout must be a finite number of seconds >= 0 (0: none), got {timeout!r}")

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
                    compiled_grammar: Any | None = None, priority: int = 0,
                    timeout: float | None = None) -> Request:
        """compiled_grammar: from compile_grammar (done earlier, off the step thread); compiled here
        when the params have structured_outputs and none is given. priority: lower is served first
        (priority policy only). timeout: seconds from arrival (queue time counts) after which the
        request is aborted with its tokens so far; None: the server's --request-timeout; 0: none."""
        self.validate_scheduling(priority, timeout)
        req = self._make_request(request_id, prompt_token_ids, params, arrival_time, trace_context,
                                 compiled_grammar, priority)
        req.deadline = self._deadline(req.arrival_time, timeout)
        self.scheduler.add_request(req)
        self.deadlines.add(req)
        self.counters.requests_added += 1
        return req

    def _make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      arrival_time: float | None = None, trace_context: dict[str, str] | None = None,
                      compiled_grammar: Any | None = None, priority: int = 0) -> Request:
        self.validate_request(prompt_token_ids, params)
        grammar = None
        if params.structured_outputs is not None:
            compiled = compiled_grammar if compiled_grammar is not None else self.compile_grammar(params)
            grammar = RequestGrammar(self.grammar_compiler.matcher(compiled), self.info.vocab_size)
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=tuple(self.info.eos_token_ids),
            arrival_time=arrival_time if arrival_time is not None else self.clock(),
            trace_context=trace_context,
            grammar=grammar,
            priority=priority,
        )

    def _deadline(self, arrival_time: float, timeout: float | None) -> float | None:
        if timeout is None:
            timeout = self.config.request_timeout
        return arrival_time + timeout if timeout > 0 else None

    def _add_group_deadlines(self, output_ids: list[str], prompt_token_ids: list[int], params: SamplingParams,
                             arrival_time: float, timeout: float | None) -> None:
        """n>1 / best_of / beam search: the deadline belongs to the client's output ids (the group's
        internal requests come and go: a hidden prefill, held best_of samples, forked beams), so each
        output id gets a marker entry; expiring one aborts it through the group, as an Abort would."""
        deadline = self._deadline(arrival_time, timeout)
        if deadline is None:
            return
        for oid in output_ids:
            marker = Request(oid, list(prompt_token_ids), params, arrival_time=arrival_time)
            marker.deadline, marker.deadline_marker = deadline, True
            self.deadlines.add(marker)

    def _deadline_live(self, req: Request) -> bool:
        """Is the request (or, for a group marker, its output id) still the one the deadline was for?"""
        live = self.scheduler.requests.get(req.request_id)
        if live is req:
            return True
        if not req.deadline_marker:
            return False
        if live is not None:  # a forked n>1 sample runs under its output id
            return live.arrival_time == req.arrival_time
        group = self.scheduler.groups.by_output_id.get(req.request_id)
        return group is not None and group.arrival_time == req.arrival_time

    def expire_requests(self) -> None:
        """Abort the requests whose deadline has passed (their blocks are freed now); their final
        deltas (finish_reason "abort", the tokens so far, error_message saying why) go out with the
        next step's outputs. Called once per step: a heap peek when nothing expires."""
        now = self.clock()
        for req in self.deadlines.expired(now, self.scheduler.num_unfinished):
            if not self._deadline_live(req):
                continue
            for done in self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_ABORTED):
                self.counters.requests_timed_out += 1
                delta = self.scheduler.abort_delta(done)
                delta.error_message = (
                    f"request timed out: not finished {now - done.arrival_time:.3g}s after arrival (timeout "
                    f"{req.deadline - req.arrival_time:g}s, queue time included); "
                    f"{len(done.output_token_ids)} tokens were generated")
                self._pending.append(delta)

    # ------------------------------------------------------------------ sequence groups
    def add_generation(self, request_id: str, output_ids: list[str], prompt_token_ids: list[int],
                       params: SamplingParams, arrival_time: float | None = None,
                       trace_context: dict[str, str] | None = None, compiled_grammar: Any | None = None,
                       priority: int = 0, timeout: float | None = None) -> list[Request]:
        """One client request, whatever its shape: a single sequence, n>1 / best_of samples or beam
        search (output_ids: one per returned sequence). Returns the requests to report metrics from.
        priority / timeout: as for add_request, for every sequence of the request (each path
        validates them)."""
        if params.use_beam_search:
            if params.structured_outputs is not None:
                raise ValueError("beam search does not support structured output")
            self.add_beam_search(request_id, output_ids, prompt_token_ids, params.beam_search_params(),
                                 arrival_time, trace_context, stop_token_ids=params.stop_token_ids,
                                 priority=priority, timeout=timeout)
            group = self.scheduler.groups.by_output_id[output_ids[0]]
            return [self.scheduler.groups._carrier(group, oid) for oid in output_ids]
        if params.n > 1 or (params.best_of or 1) > params.n:
            children = self.add_parallel_sampling(request_id, output_ids, prompt_token_ids, params, arrival_time,
                                                  trace_context, compiled_grammar, priority=priority, timeout=timeout)
            return children[: len(output_ids)]
        return [self.add_request(output_ids[0], prompt_token_ids, params, arrival_time, trace_context,
                                 compiled_grammar, priority=priority, timeout=timeout)]

    def add_parallel_sampling(self, group_id: str, output_ids: list[str], prompt_token_ids: list[int],
                              params: SamplingParams, arrival_time: float | None = None,
                              trace_context: dict[str, str] | None = None,
                              compiled_grammar: Any | None = None, priority: int = 0,
                              timeout: float | None = None) -> list[Request]:
        """n > 1 / best_of: the prompt is prefilled once and the samples fork its block table
        (engine_core/sequence_group.py). All or nothing: a bad child rejects the whole request."""
        self.validate_scheduling(priority, timeout)
        if len(output_ids) != params.n:
            raise ValueError(f"{len(output_ids)} output ids for n={params.n}")
        num = params.best_of or params.n
        best_of = num > params.n
        ids = [f"{group_id}~b{i}" for i in range(num)] if best_of else list(output_ids)
        self._check_ids_free(ids + output_ids)
        if best_of and params.structured_outputs is not None:
            raise ValueError("best_of does not support structured output")
        at = arrival_time if arrival_time is not None else self.clock()
        children = [self._make_request(cid, prompt_token_ids, child_sampling_params(params, i), at, trace_context,
                                       compiled_grammar, priority) for i, cid in enumerate(ids)]
        group = SequenceGroup(group_id, list(output_ids), list(prompt_token_ids), params, arrival_time=at,
                              held={c.request_id: _Held() for c in children} if best_of else {})
        prefill = None
        if len(prompt_token_ids) > 1:
            prefill = Request(f"{group_id}~prefill", list(prompt_token_ids[:-1]),
                              SamplingParams(temperature=0.0, max_tokens=1), arrival_time=at,
                              trace_context=trace_context, priority=priority)
        self.scheduler.groups.add_parallel(self.scheduler, group, children, prefill)
        self._add_group_deadlines(list(output_ids), prompt_token_ids, params, at, timeout)
        self.counters.requests_added += len(children)
        return children

    def _check_ids_free(self, ids: list[str]) -> None:
        """A group's ids must not collide with a running request's or another group's output ids."""
        taken = [i for i in ids if i in self.scheduler.requests or i in self.scheduler.groups.by_output_id]
        if taken:
            raise ValueError(f"request_id {taken[0]!r} is already in use")

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
                        trace_context: dict[str, str] | None = None, stop_token_ids: list[int] | None = None,
                        priority: int = 0, timeout: float | None = None) -> None:
        """Beam search on forked block tables; outputs (best first) come under output_ids when the
        search ends (engine_core/beam_search.py has HF's rules)."""
        if len(output_ids) != params.beam_width:
            raise ValueError(f"{len(output_ids)} output ids for beam_width={params.beam_width}")
        self._check_ids_free(output_ids)
        self.validate_scheduling(priority, timeout)
        eos = self.beam_eos_ids(stop_token_ids)
        beam_params = self.validate_beam_search(prompt_token_ids, params, eos)
        at = arrival_time if arrival_time is not None else self.clock()
        group = SequenceGroup(group_id, list(output_ids), list(prompt_token_ids), beam_params, arrival_time=at,
                              beam=BeamSearchState(params, eos),
                              beam_params=beam_params, max_model_len=self.max_model_len)
        first = self._make_request(group.next_id(), prompt_token_ids, beam_params, at, trace_context,
                                   priority=priority)
        self.scheduler.groups.add_beam_search(self.scheduler, group, first)
        self._add_group_deadlines(list(output_ids), prompt_token_ids, beam_params, at, timeout)
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
        self.expire_requests()
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
        if so.scheduled_spec_decode_tokens:
            for rid, toks in zip(result.req_ids, result.sampled_token_ids):
                drafts = so.scheduled_spec_decode_tokens.get(rid)
                if drafts and toks:
                    self.counters.observe_spec_decode(len(drafts), min(len(toks) - 1, len(drafts)))
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
