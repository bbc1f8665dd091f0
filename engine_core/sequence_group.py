"""Sequence groups: several sequences of one prompt on forked block tables (n > 1, best_of, beam
search). One implementation, owned by the Scheduler, so the offline LLMEngine and the scheduler
service behave identically (both drive the same EngineCore/Scheduler).

Parallel sampling (n > 1 / best_of): a hidden *prefill* request computes the prompt's first L-1
tokens once. In the first schedule() after its last chunk was scheduled, the group forks: every
child shares the prefill's blocks (ref counts, BlockManager.fork), starts with
num_computed_tokens = L-1 and goes to the front of the waiting queue; its admission computes the
last prompt token (1 token) into its own copy-on-write copy of the shared partial block and
samples with its own seed. The prefill request is dropped (the executor forgets it; its one
sampled token is discarded). The executor needs nothing new: a forked child is a NewRequestData
whose block table starts with shared block ids, and the CoW copies travel in
SchedulerOutput.block_copies (applied before the forward pass).

best_of: best_of children run under internal ids with sampled-token logprobs; their outputs are
held back and, once all have finished, the n with the highest cumulative logprob are emitted under
the output ids (OpenAI / vLLM semantics; not streamable).

Beam search: beams are requests too. Each step a beam computes one token and returns its top
`beams_to_keep` logprobs; it is then parked (never scheduled ahead of its group). When every beam
of the group has reported, BeamSearchState.step picks the next beams (HF's rules). A chosen
(beam, token) continues in place when the token is the beam's own argmax and the beam was not yet
used; otherwise it is a new request (new id) forked from the beam's blocks, whose first step
computes that token into a CoW copy of the shared partial block. Dropped beams are freed at once.
Finished hypotheses are emitted under the output ids (rank order) when the search ends.

Preemption and executor replay need nothing special: a child or beam is an ordinary request
(prompt + its tokens) and is recomputed from tokens; a forked request still waiting for admission
gives its shared blocks back on replay and is recomputed like any other.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine_core.beam_search import BeamSearchParams, BeamSearchState
from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler_output import TokenLogprobs

if TYPE_CHECKING:
    from engine_core.scheduler import RequestOutputDelta, Scheduler


def child_sampling_params(params: SamplingParams, index: int) -> SamplingParams:
    """Params of the index-th sample of a group: its own seed; best_of children need the sampled
    token's logprob to be ranked."""
    child = params.for_child(index)
    if params.best_of is not None and params.best_of > params.n and child.logprobs is None:
        child.logprobs = 0
    child.best_of = None
    return child


@dataclass
class _Held:
    """A best_of child's output, held until the whole group is done."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    final: RequestOutputDelta | None = None


@dataclass(eq=False)
class SequenceGroup:
    group_id: str
    output_ids: list[str]  # what the client sees: the n samples, or the beams in rank order
    prompt_token_ids: list[int]
    params: SamplingParams | None = None
    prefill: Request | None = None  # parallel sampling until it forks
    pending: list[Request] = field(default_factory=list)  # children not forked yet
    # best_of: internal child id -> held output.
    held: dict[str, _Held] = field(default_factory=dict)
    # Beam search.
    beam: BeamSearchState | None = None
    beam_params: SamplingParams | None = None
    max_model_len: int = 0
    beams: list[Request] = field(default_factory=list)  # running, best first
    beam_scores: dict[str, tuple[float, list[float]]] = field(default_factory=dict)  # id -> (score, logprobs)
    beam_results: dict[str, TokenLogprobs] = field(default_factory=dict)
    parked: set[str] = field(default_factory=set)  # preempted beams out of the queues (see park)
    arrival_time: float = 0.0
    num_cached_tokens: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def is_best_of(self) -> bool:
        return bool(self.held)

    def next_id(self) -> str:
        return f"{self.group_id}~{next(self._ids)}"


class SequenceGroups:
    """The scheduler's sequence groups, and the fork / select logic on top of its queues."""

    def __init__(self) -> None:
        # Ids a client may abort -> group, while the group still owns them (pending children,
        # best_of outputs, beam outputs). A forked n>1 child is an ordinary request afterwards.
        self.by_output_id: dict[str, SequenceGroup] = {}
        self.prefills: dict[str, SequenceGroup] = {}  # prefill request id -> group
        self.by_member: dict[str, SequenceGroup] = {}  # best_of child / beam id -> group

    def __bool__(self) -> bool:
        return bool(self.by_output_id or self.prefills or self.by_member)

    # ------------------------------------------------------------------ creation
    def add_parallel(self, sched: Scheduler, group: SequenceGroup, children: list[Request],
                     prefill: Request | None) -> None:
        """children carry their final request ids (output ids, or internal ids for best_of)."""
        for cid in group.output_ids:
            self.by_output_id[cid] = group
        if group.is_best_of:
            for c in children:
                self.by_member[c.request_id] = group
        if prefill is None:  # a 1-token prompt: nothing to share, the children start from scratch
            for c in children:
                sched.add_request(c)
            self._release_output_ids(group)
            return
        group.prefill, group.pending = prefill, list(children)
        self.prefills[prefill.request_id] = group
        prefill.group = group
        sched.add_request(prefill)

    def add_beam_search(self, sched: Scheduler, group: SequenceGroup, first: Request) -> None:
        for cid in group.output_ids:
            self.by_output_id[cid] = group
        self.by_member[first.request_id] = group
        first.group = group
        group.beams = [first]
        group.beam_scores[first.request_id] = (0.0, [])
        sched.add_request(first)

    def _release_output_ids(self, group: SequenceGroup) -> None:
        if not group.is_best_of and group.beam is None:
            for cid in group.output_ids:
                self.by_output_id.pop(cid, None)

    # ------------------------------------------------------------------ forking (schedule time)
    def fork_ready(self, sched: Scheduler) -> None:
        """Fork every group whose prefill was fully scheduled in an earlier step (its KV is then
        written before anything this step reads it: the executor runs steps in order)."""
        for rid, group in list(self.prefills.items()):
            pre = group.prefill
            if pre.status != RequestStatus.RUNNING or pre.num_computed_tokens < pre.num_tokens:
                continue
            del self.prefills[rid]
            for child in reversed(group.pending):
                self._fork(sched, pre, child, pre.num_computed_tokens)
            group.pending = []
            group.num_cached_tokens = max(pre.num_cached_tokens, 0)
            sched._drop(pre)
            group.prefill = None
            self._release_output_ids(group)

    @staticmethod
    def _fork(sched: Scheduler, parent: Request, child: Request, num_computed: int) -> None:
        """child shares parent's blocks for its first num_computed tokens and waits (front of the
        queue) for the step that computes the rest (1 token: CoW of the shared partial block)."""
        if parent.status == RequestStatus.RUNNING and sched.block_manager.get_block_ids(parent.request_id):
            child.num_computed_tokens = num_computed
            sched.block_manager.fork(parent, child)
            child.fork_pending = True
        if child.num_cached_tokens < 0:
            child.num_cached_tokens = max(parent.num_cached_tokens, 0)
        sched.add_request(child, front=True)

    def park(self, req: Request) -> bool:
        """A preempted beam whose step result its group already holds leaves the waiting queue
        (recomputing it now would only be preempted again); the group's next step re-queues it if
        it continues in place."""
        group = self.by_member.get(req.request_id)
        if group is None or group.beam is None or req.request_id not in group.beam_results or req.fork_pending:
            return False
        group.parked.add(req.request_id)
        return True

    # ------------------------------------------------------------------ results
    def on_result(self, req: Request, token_ids: list[int], logprobs: list[TokenLogprobs] | None) -> bool:
        """Take a beam's step result (True: the scheduler must not treat it as a token)."""
        group = self.by_member.get(req.request_id)
        if group is None or group.beam is None:
            return False
        req.num_output_placeholders = max(0, req.num_output_placeholders - 1)
        if logprobs:
            group.beam_results[req.request_id] = logprobs[0]
        return True

    def advance_beams(self, sched: Scheduler) -> list[RequestOutputDelta]:
        """Run a beam step for every group whose beams have all reported."""
        out: list[RequestOutputDelta] = []
        for group in {id(g): g for g in self.by_member.values() if g.beam is not None}.values():
            if group.beams and all(b.request_id in group.beam_results for b in group.beams):
                out.extend(self._beam_step(sched, group))
        return out

    def _beam_step(self, sched: Scheduler, group: SequenceGroup) -> list[RequestOutputDelta]:
        beams = group.beams
        first = beams[0]
        gen_len = len(first.output_token_ids) + 1
        length_exhausted = gen_len >= group.beam.params.max_tokens or first.num_tokens + 1 >= group.max_model_len
        info = []
        top = []
        for b in beams:
            score, lps = group.beam_scores[b.request_id]
            info.append((score, list(b.output_token_ids), lps))
            r = group.beam_results[b.request_id]
            top.append((r.top_token_ids, r.top_logprobs))
        sampled = [group.beam_results[b.request_id].token_id for b in beams]
        decision = group.beam.step(info, top, gen_len, length_exhausted)
        group.beam_results.clear()
        if decision.done:
            return self._finish_beams(sched, group)
        used: set[int] = set()
        new_beams: list[Request] = []
        for c in decision.running:
            parent = beams[c.parent]
            _, toks, lps = info[c.parent]
            # In place only when the executor's copy is exactly this beam plus its argmax (no
            # recompute in flight after a preemption).
            if c.parent not in used and c.token_id == sampled[c.parent] and parent.num_output_placeholders == 0:
                used.add(c.parent)
                parent.output_token_ids.append(c.token_id)  # the executor holds the same argmax
                if parent.request_id in group.parked:  # preempted meanwhile: recomputed from its tokens
                    group.parked.discard(parent.request_id)
                    sched.waiting.appendleft(parent)
                group.beam_scores[parent.request_id] = (c.score, lps + [c.logprob])
                new_beams.append(parent)
                continue
            child = Request(group.next_id(), list(group.prompt_token_ids), group.beam_params,
                            eos_token_ids=parent.eos_token_ids, arrival_time=parent.arrival_time,
                            output_token_ids=toks + [c.token_id], priority=parent.priority)
            child.first_scheduled_time, child.first_token_time = parent.first_scheduled_time, parent.first_token_time
            child.group = group
            self.by_member[child.request_id] = group
            group.beam_scores[child.request_id] = (c.score, lps + [c.logprob])
            self._fork(sched, parent, child, parent.num_computed_tokens)
            new_beams.append(child)
        for i, b in enumerate(beams):
            if i not in used:
                self._drop_beam(sched, group, b)
        group.beams = new_beams
        return []

    def _drop_beam(self, sched: Scheduler, group: SequenceGroup, b: Request) -> None:
        group.parked.discard(b.request_id)
        sched._drop(b)
        self.by_member.pop(b.request_id, None)
        group.beam_scores.pop(b.request_id, None)

    def _finish_beams(self, sched: Scheduler, group: SequenceGroup) -> list[RequestOutputDelta]:
        from engine_core.scheduler import RequestOutputDelta

        for b in group.beams:
            self._drop_beam(sched, group, b)
        group.beams = []
        deltas = []
        for i, oid in enumerate(group.output_ids):
            self.by_output_id.pop(oid, None)
            if i < len(group.beam.finished):
                h = group.beam.finished[i]
                deltas.append(RequestOutputDelta(oid, h.token_ids, None, h.finish_reason, None,
                                                 len(group.prompt_token_ids), len(h.token_ids),
                                                 group.num_cached_tokens, cumulative_logprob=h.cumulative_logprob,
                                                 score=h.score))
            else:  # fewer hypotheses than beams (cannot happen with HF's rules; be safe)
                deltas.append(RequestOutputDelta(oid, [], None, "length", None, len(group.prompt_token_ids), 0,
                                                 group.num_cached_tokens))
        return deltas

    # ------------------------------------------------------------------ best_of
    def filter_deltas(self, deltas: list[RequestOutputDelta]) -> list[RequestOutputDelta]:
        """Hold best_of children's outputs; emit the best n once the group is done."""
        if not self.by_member:
            return deltas
        out = []
        for d in deltas:
            group = self.by_member.get(d.request_id)
            if group is None or not group.is_best_of:
                out.append(d)
                continue
            h = group.held[d.request_id]
            h.token_ids.extend(d.new_token_ids)
            h.logprobs.extend(d.new_logprobs or [])
            if d.finished:
                h.final = d
                self.by_member.pop(d.request_id, None)
                if all(x.final is not None for x in group.held.values()):
                    out.extend(self._emit_best_of(group))
        return out

    def _emit_best_of(self, group: SequenceGroup) -> list[RequestOutputDelta]:
        from engine_core.scheduler import RequestOutputDelta

        ranked = select_best_of(list(group.held.values()), len(group.output_ids))
        keep_lp = group.params.logprobs is not None
        out = []
        for oid, h in zip(group.output_ids, ranked):
            self.by_output_id.pop(oid, None)
            f = h.final
            out.append(RequestOutputDelta(oid, h.token_ids, list(h.logprobs) if keep_lp else None, f.finish_reason,
                                          f.stop_reason, f.num_prompt_tokens, len(h.token_ids), f.num_cached_tokens,
                                          cumulative_logprob=sum(lp.logprob for lp in h.logprobs)))
        return out

    # ------------------------------------------------------------------ abort / replay
    def abort(self, sched: Scheduler, rid: str) -> list[Request] | None:
        """Abort an id the group owns: one pending child, or a whole best_of / beam group (its
        outputs only exist together). Returns carrier requests for the finished output ids, or
        None when rid is not group-owned."""
        group = self.by_output_id.get(rid)
        if group is None:
            return None
        if group.prefill is not None and not group.is_best_of:  # n>1 before the fork: drop one child
            child = next(c for c in group.pending if c.request_id == rid)
            group.pending.remove(child)
            self.by_output_id.pop(rid, None)
            if not group.pending:
                self.prefills.pop(group.prefill.request_id, None)
                sched._drop(group.prefill)
                group.prefill = None
            return [self._carrier(group, rid)]
        # best_of / beam: the whole group goes.
        done = []
        if group.prefill is not None:
            self.prefills.pop(group.prefill.request_id, None)
            sched._drop(group.prefill)
            group.prefill = None
        for c in group.pending:
            self.by_member.pop(c.request_id, None)
        group.pending = []
        for mid in [m for m, g in self.by_member.items() if g is group]:
            req = sched.requests.get(mid)
            if req is not None:
                sched._drop(req)
            self.by_member.pop(mid, None)
        group.beams = []
        for oid in group.output_ids:
            if self.by_output_id.pop(oid, None) is not None:
                done.append(self._carrier(group, oid))
        return done

    @staticmethod
    def _carrier(group: SequenceGroup, rid: str) -> Request:
        req = Request(rid, list(group.prompt_token_ids), group.params or SamplingParams(),
                      arrival_time=group.arrival_time)
        req.num_cached_tokens = group.num_cached_tokens
        return req


def select_best_of(samples: list, n: int) -> list:
    """The n samples with the highest cumulative logprob (vLLM/OpenAI best_of); stable on ties."""
    def cum(s) -> float:
        return sum(lp.logprob for lp in s.logprobs)

    return sorted(samples, key=lambda s: -cum(s))[:n]


__all__ = ["BeamSearchParams", "SequenceGroup", "SequenceGroups", "child_sampling_params", "select_best_of"]
