"""Stats for the EngineLoop: queue sizes for admission control, the periodic SchedulerStats
snapshot (dashboards, /metrics, WatchStats) with token-rate windows and the KV block map. A mixin:
the state lives on the EngineLoop."""
from __future__ import annotations

import time

from engine_core.request import RequestStatus
from services.gen.pagedserve.v1 import scheduler_pb2


class StatsPublishing:
    """EngineLoop methods that publish what the event loop reads."""

    STATS_PUBLISH_INTERVAL_S = 0.25
    THROUGHPUT_WINDOW_S = 10.0

    def _publish_queues(self) -> None:
        sched = self.core.scheduler
        self.num_waiting, self.num_running = len(sched.waiting), len(sched.running)

    def _publish(self) -> None:
        now = time.monotonic()
        # Also right away when the engine goes idle, so an idle scrape sees the final numbers.
        idle_news = (self.core is not None and not self.core.has_unfinished_requests()
                     and self.core.counters.num_steps != self._published_steps)
        if idle_news or now - self._last_publish >= self.STATS_PUBLISH_INTERVAL_S:
            self._last_publish = now
            self.last_stats = self.stats_proto(False)
            if self.core is not None:
                self._published_steps = self.core.counters.num_steps

    def _rates(self, now: float) -> tuple[float, float]:
        c = self.core.counters
        samples = self._throughput
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, c.prompt_tokens, c.generation_tokens))
        while len(samples) > 1 and samples[1][0] <= now - self.THROUGHPUT_WINDOW_S:
            samples.popleft()
        t0, p0, g0 = samples[0]
        dt = now - t0
        if dt <= 0:
            return 0.0, 0.0
        return (c.prompt_tokens - p0) / dt, (c.generation_tokens - g0) / dt

    def stats_proto(self, include_requests: bool) -> scheduler_pb2.SchedulerStats:
        """A SchedulerStats snapshot (engine thread only)."""
        out = scheduler_pb2.SchedulerStats(timestamp=time.time(), max_queue_len=self.max_queue_len,
                                           num_requests_rejected=self.num_rejected,
                                           executor_healthy=self._down_since is None)
        core = self.core
        if core is None:
            out.num_waiting = len(self._deferred)
            return out
        sched, bm, c = core.scheduler, core.scheduler.block_manager, core.counters
        st = core.stats()
        out.num_running = st.num_running
        out.num_waiting = st.num_waiting + len(self._deferred)
        out.kv_cache_usage = st.kv_cache_usage
        out.num_kv_blocks = st.num_kv_blocks
        out.num_free_blocks = st.num_free_blocks
        out.num_kv_blocks_cached = bm.num_cached_blocks
        out.num_tokens_in_used_blocks = sum(min(r.num_computed_tokens, r.num_tokens) for r in sched.running)
        out.prefix_cache_queries = st.prefix_cache_queries
        out.prefix_cache_hits = st.prefix_cache_hits
        out.prefix_cache_hit_rate = st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0
        out.num_preemptions = st.num_preemptions
        out.num_steps = c.num_steps
        out.prompt_tokens_total = c.prompt_tokens
        out.generation_tokens_total = c.generation_tokens
        for reason, count in st.finished_by_reason.items():
            out.finished_by_reason[reason] = count
        out.executor_restarts = c.executor_restarts
        out.prompt_throughput_tps, out.generation_throughput_tps = self._rates(time.monotonic())
        out.step_num_batched_tokens = st.step_num_batched_tokens
        out.step_num_seqs = st.step_num_seqs
        if include_requests:
            for status, reqs in (("running", sched.running), ("waiting", sched.waiting)):
                for r in reqs:
                    s = "preempted" if status == "waiting" and r.status == RequestStatus.PREEMPTED else status
                    out.requests.add(request_id=r.request_id, status=s, num_prompt_tokens=r.num_prompt_tokens,
                                     num_output_tokens=len(r.output_token_ids),
                                     num_computed_tokens=r.num_computed_tokens,
                                     block_ids=bm.get_block_ids(r.request_id))
            for block_id, (ref, cached, holders) in sorted(bm.snapshot().items()):
                out.blocks.add(block_id=block_id, ref_count=ref, cached=cached, request_ids=holders)
        return out
