"""Continuous (iteration-level) batching over the paged KV cache, after vLLM v1's scheduler.

Each step has a token budget (`max_num_batched_tokens`) shared by running requests (decodes, or
the rest of a chunked prefill) and waiting requests (prefill chunks), FCFS. When KV blocks run out,
the most recently admitted running request is preempted by recompute: its blocks are freed and it
goes back to the front of the queue; on resumption its prompt + generated tokens are prefilled
again (prefix-cache hits usually make that cheap).
Under --scheduling-policy priority the waiting order, the victim, and preemption for a waiting
higher-priority request come from request_queue.py (docs/scheduling.md).

The output is a SchedulerOutput of *deltas* (DESIGN.md §2): new requests carry their tokens and
block table once; running requests carry only new block ids and a token count.
`num_computed_tokens` is advanced at schedule time, so the next step can be planned while this
one is still executing (async scheduling).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine_core.block_manager import BlockManager
from engine_core.request import Request, RequestStatus
from engine_core.request_queue import SchedulingPolicy, create_request_queue
from engine_core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from engine_core.sequence_group import SequenceGroups
from engine_core.structured_output.request_grammar import (
    BitmaskFiller,
    accept_first_tokens,
)


@dataclass
class RequestOutputDelta:
    """What one step produced for one request (the unit streamed to clients)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error_message: str | None = None  # why the engine ended it (a timeout: finish_reason "abort")
    # Sequence-group outputs only (best_of, beam search): the sample's cumulative logprob and
    # the beam's length-penalised score.
    cumulative_logprob: float | None = None
    score: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_kv_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    step_num_batched_tokens: int = 0
    step_num_seqs: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        max_admission_delay_steps: int = 0,
        long_prefill_token_threshold: int = 0,
        scheduling_policy: SchedulingPolicy | str = SchedulingPolicy.FCFS,
        num_lookahead_slots: int = 0,
    ) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        # FCFS (a deque) or priority order: engine_core/request_queue.py.
        self.waiting = create_request_queue(scheduling_policy)
        self.running: list[Request] = []
        # Requests the executor must forget at the start of the next step.
        self._finished_req_ids: set[str] = set()
        self._step_id = 0
        self.num_preemptions = 0
        self.finished_by_reason: dict[str, int] = {}
        self._last_step_tokens = 0
        self._last_step_seqs = 0
        # Admission batching (see _admit_now): how many steps new work may wait while requests are
        # decoding, and how many it has waited.
        self.max_admission_delay_steps = max_admission_delay_steps
        self._admission_delayed = 0
        # Unfinished requests under a grammar: each step's bitmask needs their previous token.
        self._grammar_req_ids: set[str] = set()
        self._bitmask_filler: BitmaskFiller | None = None
        # Largest prefill chunk while other requests share the engine (0: no cap): a long prompt
        # then leaves room in every step for the others' decodes and for a newcomer's prefill.
        self.long_prefill_token_threshold = long_prefill_token_threshold
        # Speculative decoding with a draft model: KV slots its k passes write past the verified
        # positions (SpeculativeConfig.num_lookahead_slots), allocated when there is room.
        self.num_lookahead_slots = num_lookahead_slots
        # n>1 / best_of / beam search on forked block tables (engine_core/sequence_group.py).
        self.groups = SequenceGroups()

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, request: Request, front: bool = False) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        blocks_needed = -(-(request.num_prompt_tokens + 1) // self.block_size)
        usable = self.block_manager.num_usable_blocks
        if blocks_needed > usable:
            raise ValueError(
                f"prompt of {request.num_prompt_tokens} tokens needs {blocks_needed} KV blocks, "
                f"but the KV cache only has {usable}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if front:  # a forked sequence: next in line, it holds shared blocks
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)
        if request.grammar is not None:
            self._grammar_req_ids.add(request.request_id)

    def finish_requests(self, request_ids: list[str], status: RequestStatus,
                        stop_reason: int | str | None = None) -> list[Request]:
        """Finish requests from outside the step loop (abort, stop string found by the detokenizer)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None and self.groups:
                owned = self.groups.abort(self, rid)  # a sequence group's id (pending, best_of, beams)
                for carrier in owned or ():
                    carrier.status, carrier.stop_reason = status, stop_reason
                    self._count_finished(carrier)
                    done.append(carrier)
                continue
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.stop_reason = stop_reason
            self._finish(req, status)
            done.append(req)
        return done

    def _release(self, req: Request, status: RequestStatus) -> None:
        """The request is done: its blocks go back (shared ones stay with their other holders) and
        the executor forgets it at the next step."""
        req.status = status
        self.block_manager.free(req)
        self._finished_req_ids.add(req.request_id)
        self.requests.pop(req.request_id, None)
        self._grammar_req_ids.discard(req.request_id)

    def _count_finished(self, req: Request) -> None:
        reason = req.finish_reason or "unknown"
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self._release(req, status)
        self._count_finished(req)

    def _drop(self, req: Request) -> None:
        """Retire a sequence-group member silently (a forked prefill, a dropped beam): released
        like a finished request, but no output and no finish reason counted."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.status.finished and req in self.waiting:
            self.waiting.remove(req)
        self._release(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_grammar_requests(self) -> bool:
        """Structured-output requests are unfinished (their bitmasks need every earlier step's
        result applied, which bounds how many steps may be in flight)."""
        return bool(self._grammar_req_ids)

    def fill_grammar_bitmasks(self, req_ids: list[str]) -> dict[str, np.ndarray]:
        """Bitmasks for the next sampled position of each request still running under a grammar
        (one batched, multi-threaded fill). Call once every earlier step's result is applied."""
        grammars = []
        ids = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is not None and req.grammar is not None and req.status == RequestStatus.RUNNING:
                grammars.append(req.grammar)
                ids.append(rid)
        if not grammars:
            return {}
        if self._bitmask_filler is None:
            self._bitmask_filler = BitmaskFiller()
        masks = self._bitmask_filler.fill(grammars)
        return {rid: masks[i] for i, rid in enumerate(ids)}

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ schedule
    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_output_placeholders = 0  # in-flight samples are dropped; recomputed on resumption
        req.spec_token_ids = None  # drafts are proposed again once it runs
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Behind forked sequences still waiting for admission: they hold shared blocks and need
        # at most one more each, so admitting them first cannot deadlock on blocks.
        i = 0
        while i < len(self.waiting) and self.waiting[i].fork_pending:
            i += 1
        self.waiting.insert(i, req)
        # The executor drops its copy; on resumption it gets a NewRequestData with all tokens.
        self._finished_req_ids.add(req.request_id)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput(step_id=self._step_id)
        self._step_id += 1
        scheduled: list[tuple[Request, int]] = []
        preempted_any = False
        self.waiting.order_running(self.running)  # priority policy: running[-1] is the lowest
        if self.groups:
            self.groups.fork_ready(self)

        # 1) Running requests first: decodes and unfinished chunked prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens + req.num_output_placeholders - req.num_computed_tokens, budget)
            num_new = self._cap_prefill_chunk(num_new, len(self.running) > 1 or bool(self.waiting))
            if num_new <= 0 or self._done_when_in_flight_returns(req):
                i += 1
                continue
            drafts = self._drafts_to_verify(req, num_new, budget)
            num_new += len(drafts)
            while True:
                new_blocks = self._allocate_with_lookahead(req, num_new)
                if new_blocks is not None:
                    break
                victim = self.running.pop()  # lowest priority: the latest admitted
                self._preempt(victim)
                preempted_any = True
                if victim is req:
                    break
            if new_blocks is None:
                break  # req itself was preempted; everything after it already was too
            out.scheduled_cached_reqs.append(CachedRequestData(
                req.request_id, new_blocks, req.num_computed_tokens,
                self.block_manager.take_replaced_blocks(req.request_id) if self.groups else []))
            if drafts:
                out.scheduled_spec_decode_tokens[req.request_id] = drafts
            scheduled.append((req, num_new))
            budget -= num_new
            i += 1

        # 2) Waiting requests, FCFS, while budget, sequence slots and blocks last. Admitting new
        # work in a step that had to preempt would only thrash, so skip it then.
        admit = (self._admit_now() or bool(self.waiting and self.waiting[0].fork_pending)) and not preempted_any
        while admit and self.waiting and budget > 0:
            req = self.waiting[0]
            if req.group is not None and self.groups.park(req):
                self.waiting.popleft()  # a preempted beam with its result: nothing to compute until its group steps
                continue
            if len(self.running) >= self.max_num_seqs:
                freed = self._preempt_for(req, scheduled, out)  # priority policy: a lower one's slot
                if freed is None:
                    break
                budget += freed
            if req.fork_pending:  # forked: it holds its group's blocks, computes only what follows
                computed_ids, num_computed = [], req.num_computed_tokens
            else:
                # Stats are recorded on admission only: a request that does not fit is looked up again.
                computed_ids, num_computed = self.block_manager.get_computed_blocks(req, record_stats=False)
            num_new = req.num_tokens - num_computed
            if self.enable_chunked_prefill:
                num_new = self._cap_prefill_chunk(num_new, bool(self.running) or len(self.waiting) > 1)
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            new_blocks = self.block_manager.allocate_slots(req, num_new, computed_ids)
            if (new_blocks is None and (req.fork_pending or req.group is not None)
                    and self._make_room_for_group(req, {r.request_id for r, _ in scheduled})):
                preempted_any = True
                continue  # look it up and allocate again
            if new_blocks is None:
                freed = self._preempt_for(req, scheduled, out)  # priority policy: a lower one's blocks
                if freed is None:
                    break
                budget += freed
                continue
            if not req.fork_pending:
                self.block_manager.record_prefix_cache_lookup(req.num_tokens, num_computed)
            req.fork_pending = False
            self.block_manager.take_replaced_blocks(req.request_id)  # its NewRequestData has the final table
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.num_computed_tokens = num_computed
            req.admitted_step = out.step_id
            out.scheduled_new_reqs.append(NewRequestData(
                req_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling_params=req.sampling_params,
                block_ids=self.block_manager.get_block_ids(req.request_id),
                num_computed_tokens=num_computed,
                output_token_ids=list(req.output_token_ids),
                trace_context=req.trace_context,
            ))
            scheduled.append((req, num_new))
            budget -= num_new

        for req, num_new in scheduled:
            out.num_scheduled_tokens[req.request_id] = num_new
            req.num_computed_tokens += num_new
            num_drafts = len(out.scheduled_spec_decode_tokens.get(req.request_id, ()))
            if req.num_computed_tokens == req.num_tokens + req.num_output_placeholders + num_drafts:
                req.num_output_placeholders += 1  # this step samples the next token
                if req.grammar is not None:
                    out.grammar_req_ids.append(req.request_id)  # bitmask: EngineCore, when its token is known
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        # A request preempted this step may also have finished earlier; either way the executor
        # must drop it before running this step (a resumed one arrives as a NewRequestData).
        out.finished_req_ids = self._finished_req_ids - {r.req_id for r in out.scheduled_new_reqs}
        self._finished_req_ids = set()
        out.block_copies = self.block_manager.take_block_copies()
        self._last_step_tokens = out.total_num_scheduled_tokens
        self._last_step_seqs = len(scheduled)
        return out

    def _preempt_for(self, req: Request, scheduled: list[tuple[Request, int]], out: SchedulerOutput) -> int | None:
        """Priority policy: waiting `req` cannot be admitted (no sequence slot or KV blocks), so
        preempt the lowest-priority running request (latest arrival among equals) if `req`
        outranks it. Returns the step budget it gave back (it may have been scheduled in this
        step already), or None: nobody to preempt (always None under FCFS)."""
        if not self.running or not self.waiting.preempts_running:
            return None
        victim = max(self.running, key=lambda r: (r.priority, r.arrival_time))
        if not self.waiting.outranks(req, victim):
            return None
        self.running.remove(victim)
        freed = 0
        for k, (r, n) in enumerate(scheduled):
            if r is victim:  # scheduled earlier in this step: take it back out of the step
                del scheduled[k]
                freed = n
                rid = victim.request_id
                out.scheduled_cached_reqs = [c for c in out.scheduled_cached_reqs if c.req_id != rid]
                out.scheduled_new_reqs = [c for c in out.scheduled_new_reqs if c.req_id != rid]
                out.scheduled_spec_decode_tokens.pop(rid, None)
                break
        self._preempt(victim)
        return freed

    def _drafts_to_verify(self, req: Request, num_new: int, budget: int) -> list[int]:
        """The request's proposed drafts to verify this step (and consume): only for a plain decode
        (not a prefill chunk, nothing in flight), capped so that accepted drafts + the bonus token
        never pass max_tokens or max_model_len, and by the step's token budget."""
        drafts, req.spec_token_ids = req.spec_token_ids, None
        if (not drafts or num_new != 1 or req.num_output_placeholders
                or req.num_computed_tokens + 1 != req.num_tokens):
            return []
        k = min(len(drafts), budget - 1, self.max_model_len - req.num_tokens - 1)
        mt = req.sampling_params.max_tokens
        if mt is not None:
            k = min(k, mt - len(req.output_token_ids) - 1)
        return drafts[:k] if k > 0 else []

    def _allocate_with_lookahead(self, req: Request, num_new: int) -> list[int] | None:
        """allocate_slots, plus the draft model's lookahead slots when a step samples and they fit
        (never a reason to preempt: without them the proposer just drafts fewer tokens)."""
        la = min(self.num_lookahead_slots, self.max_model_len - req.num_computed_tokens - num_new)
        if la > 0:
            blocks = self.block_manager.allocate_slots(req, num_new + la)
            if blocks is not None:
                return blocks
        return self.block_manager.allocate_slots(req, num_new)

    def _make_room_for_group(self, req: Request, scheduled: set[str]) -> bool:
        """A forked sequence or a beam its group waits for must not wait behind parked beams (that
        would deadlock): preempt the latest running request that is neither scheduled this step nor
        has a sample in flight (a parked beam keeps its reported result). False: none to preempt."""
        victim = next((r for r in reversed(self.running)
                       if r.request_id not in scheduled and r.num_output_placeholders == 0), None)
        if victim is None:
            return False
        self.running.remove(victim)
        self._preempt(victim)
        return True

    def _cap_prefill_chunk(self, num_new: int, shared: bool) -> int:
        t = self.long_prefill_token_threshold
        return min(num_new, t) if shared and t > 0 else num_new

    def _admit_now(self) -> bool:
        """Admission batching. A step that prefills anything cannot replay a decode CUDA graph, so
        its host cost is that of an eager forward (several times a graph's). Under steady load
        requests finish a few per step; admitting each at once would make nearly every step
        eager. So while requests are decoding, new ones wait until they fill a batch (enough to
        take 1/16 of the sequence slots, or every free slot) or until they have waited
        max_admission_delay_steps steps. An idle engine admits at once (no latency at low load)."""
        if not self.waiting or self.max_admission_delay_steps <= 0 or not self.running:
            self._admission_delayed = 0
            return True
        free_slots = self.max_num_seqs - len(self.running)
        if (len(self.waiting) >= min(free_slots, max(1, self.max_num_seqs // 16))
                or self._admission_delayed >= self.max_admission_delay_steps):
            self._admission_delayed = 0
            return True
        self._admission_delayed += 1
        return False

    def _done_when_in_flight_returns(self, req: Request) -> bool:
        """With samples in flight, would the request surely be finished by max_tokens or
        max_model_len once they land? Then scheduling it again would only compute a token to throw
        away (and could run past max_model_len). An EOS or stop token can only be seen when it
        lands: that costs one discarded token (async scheduling's "stop one step late")."""
        k = req.num_output_placeholders
        if k > 0 and req.group is not None:
            return True  # a beam waits for its group's choice; a forking prefill never decodes
        return k > 0 and self._length_reached(req, extra_tokens=k)

    def _length_reached(self, req: Request, extra_tokens: int = 0) -> bool:
        """max_tokens or max_model_len reached, counting `extra_tokens` still being sampled."""
        mt = req.sampling_params.max_tokens
        if mt is not None and len(req.output_token_ids) + extra_tokens >= mt:
            return True
        return req.num_tokens + extra_tokens >= self.max_model_len

    # ------------------------------------------------------------------ results
    def update_from_output(self, so: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutputDelta]:
        """Apply one step's sampled tokens. With async scheduling this runs one step late: the
        next step already holds a slot for each request; if a request finishes here, the token
        that slot produces is discarded (the request is gone when its result arrives)."""
        deltas: list[RequestOutputDelta] = []
        now = time.monotonic()
        live = []
        for req_id, token_ids, logprobs in zip(result.req_ids, result.sampled_token_ids, result.logprobs):
            req = self.requests.get(req_id)
            if (req is None or req.status != RequestStatus.RUNNING or not token_ids
                    or req.admitted_step > so.step_id):
                continue  # aborted/preempted while in flight (stale), or a prefill chunk (no token yet)
            if req.group is not None and (req.request_id in self.groups.prefills
                                          or self.groups.on_result(req, token_ids, logprobs)):
                continue  # a forking prefill's sample is discarded; a beam's goes to its group
            live.append((req, token_ids, logprobs))
        # Grammar matchers take each request's first new token in one batched call.
        grammar_ok = accept_first_tokens([(req.grammar, toks[0]) for req, toks, _ in live
                                          if req.grammar is not None]) if self._grammar_req_ids else []
        g = 0
        drafts_of = so.scheduled_spec_decode_tokens
        spec_of = dict(zip(result.req_ids, result.spec_token_ids)) if result.spec_token_ids else {}
        for req, token_ids, logprobs in live:
            req.num_output_placeholders = max(0, req.num_output_placeholders - 1)
            if drafts_of and req.request_id in drafts_of:
                # Rejected drafts' positions were computed for nothing: roll back (their KV slots
                # are overwritten later; blocks stay with the request).
                req.num_computed_tokens -= len(drafts_of[req.request_id]) - (len(token_ids) - 1)
            if req.first_token_time is None:
                req.first_token_time = now
            accepted: list[int] = []
            for i, tok in enumerate(token_ids):
                req.output_token_ids.append(tok)
                accepted.append(tok)
                status = self._check_stop(req, tok)
                if req.grammar is not None:
                    ok = grammar_ok[g] if i == 0 else req.grammar.accept(tok)
                    g += i == 0
                    if not ok and status is None:
                        status = RequestStatus.FINISHED_STOPPED  # the grammar is complete (or rejects)
                if status is not None:
                    break
            lps = logprobs[: len(accepted)] if logprobs is not None else None
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            else:
                req.spec_token_ids = spec_of.get(req.request_id) or None
            deltas.append(self._delta(req, accepted, lps))
        if self.groups:
            deltas = self.groups.filter_deltas(deltas) + self.groups.advance_beams(self)
        return deltas

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        sp = req.sampling_params
        n_out = len(req.output_token_ids)
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and tok in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if self._length_reached(req):
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _delta(req: Request, tokens: list[int], logprobs: list[TokenLogprobs] | None) -> RequestOutputDelta:
        return RequestOutputDelta(
            request_id=req.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )

    def abort_delta(self, req: Request) -> RequestOutputDelta:
        return self._delta(req, [], None)

    def requests_for_replay(self) -> list[Request]:
        """After an executor restart: every unfinished request goes back to waiting (front, in
        order) with its tokens, so it is re-prefilled from prompt + generated tokens."""
        for req in reversed(self.running):
            self._preempt(req)
            self.num_preemptions -= 1  # not a capacity preemption
            req.num_preemptions -= 1
        self.running = []
        self._finished_req_ids = set()
        for req in self.waiting:  # forked, not admitted: recomputed from tokens like the rest
            if req.fork_pending:
                self.block_manager.free(req)
                req.fork_pending, req.num_computed_tokens = False, 0
        # A restarted executor has an empty KV cache: a prefix "hit" on a block its predecessor
        # computed would feed the model garbage, so the cache index goes too (no block is held now).
        self.block_manager.reset_prefix_cache()
        return list(self.waiting)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=bm.usage,
            num_kv_blocks=bm.num_usable_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            step_num_batched_tokens=self._last_step_tokens,
            step_num_seqs=self._last_step_seqs,
            finished_by_reason=dict(self.finished_by_reason),
        )
