"""Model runner: owns the KV cache tensors and the persistent input batch, turns a SchedulerOutput
of deltas into model inputs, runs the model and samples.

A step is three stages, each its own method: `_prepare_inputs` (deltas -> host numpy -> one pinned
non-blocking copy per dtype), `_forward` (CUDA graph for pure-decode batches, eager otherwise) and
`_sample_step`. `submit` runs them and returns at once (a structured-output step whose grammar
bitmasks are deferred stops before sampling until `provide_bitmasks`); the sampled ids start their copy to pinned host
memory behind a CUDA event, and `get_result` waits for that event only. So with async scheduling
the host prepares step N+1 while the device runs step N, and step N+1 takes the ids step N samples
straight from device memory (`pending` positions): the GPU never waits for Python.

`get_result` may run on another thread than `submit` (the executor service does this); the lock
serialises their host-state updates, never a device wait.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine_core.executor.base import ExecutorError
from engine_core.executor.cuda_graph import CudaGraphRunner
from engine_core.executor.input_batch import InputBatch, StepInputs
from engine_core.layers.attention import raw_kv_view
from engine_core.layers.attention_metadata import AttentionMetadata, as_decode_rows
from engine_core.layers.sampler import Sampler, SamplerOutput, make_generator
from engine_core.model_config import ModelConfig
from engine_core.sampling_metadata import SamplingMetadata
from engine_core.sampling_params import GREEDY_EPS
from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine_core.spec_decode.config import SpeculativeConfig
from engine_core.spec_decode.draft_model_proposer import (
    DraftModelProposer,
    DraftRequest,
)
from engine_core.spec_decode.ngram_proposer import NgramProposer
from engine_core.spec_decode.rejection_sampler import (
    rejection_sample,
    target_distribution,
)
from engine_core.structured_output.bitmask import BitmaskApplier


@dataclass
class RunnerStats:
    """Host-side accounting for benchmarks: time spent in submit (prepare + launch) and blocked
    waiting for the device in get_result."""

    steps: int = 0
    submit_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class _StepHandle:
    """A submitted step: its device outputs on their way to the host."""

    step_id: int
    req_ids: list[str]
    sample_idx: np.ndarray  # batch positions that sampled
    rows: np.ndarray  # persistent rows of the sampling requests
    generations: np.ndarray  # their row generations at submit time
    num_logprobs: list[int | None]
    sampled_device: torch.Tensor | None  # [S] int64, feeds the next step's pending positions
    host: SamplerOutput | None  # pinned host copies (filled asynchronously on CUDA)
    event: torch.cuda.Event | None
    t0: float
    materialized: bool = False
    tokens: list[int] = field(default_factory=list)
    # Forward pass done, sampling waits for the grammar bitmasks (SchedulerOutput.bitmasks_deferred).
    awaiting_bitmasks: tuple | None = None
    sampled: threading.Event = field(default_factory=threading.Event)  # set once a deferred step sampled
    # Speculative decoding (synchronous steps): per sampling request its emitted tokens, their
    # logprobs and the drafts proposed for the next step.
    token_lists: list[list[int]] | None = None
    logprob_lists: list[list | None] | None = None
    draft_lists: list[list[int]] | None = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _to_host_async(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, *, device: torch.device,
                 dtype: torch.dtype, block_size: int, num_blocks: int, seed: int = 0,
                 cuda_graphs: bool = False, max_num_seqs: int = 256, max_model_len: int = 8192,
                 num_kv_heads: int | None = None, kv_dtype: torch.dtype | None = None,
                 speculative_config: SpeculativeConfig | None = None,
                 draft_model: nn.Module | None = None, draft_model_config: ModelConfig | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = list(model_config.eos_token_ids)
        self.sampler = Sampler()
        self.batch = InputBatch(block_size, max_model_len, initial_rows=max(8, min(max_num_seqs, 1024)))
        # Unseeded requests draw from one engine generator, so a run with a fixed engine seed
        # is reproducible as a whole.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        mc = model_config
        # KV heads held here: all of the model's, or this tensor-parallel rank's share.
        self.num_kv_heads = num_kv_heads or mc.num_key_value_heads
        # One tensor per layer: [2 (K,V), num_blocks, block_size, num_kv_heads, head_dim]. Zeroed so
        # padded gathers never read NaN garbage. kv_dtype: the model dtype, or fp8 (--kv-cache-dtype).
        self.kv_caches = self._allocate_kv_caches(mc, num_blocks, block_size, self.num_kv_heads,
                                                  kv_dtype or dtype, device)
        self.graph_runner: CudaGraphRunner | None = None
        if cuda_graphs and device.type == "cuda":
            # With speculation a verification step runs as k+1 decode rows per request (as_decode_rows).
            rows_per_seq = 1 + (speculative_config.num_speculative_tokens if speculative_config else 0)
            self.graph_runner = CudaGraphRunner(model, self.kv_caches, max_num_seqs=max_num_seqs * rows_per_seq,
                                                max_model_len=max_model_len, block_size=block_size, device=device)
            self.graph_runner.capture()
        self._lock = threading.Lock()
        self._unmaterialized: deque[_StepHandle] = deque()  # sampled ids not yet in the input batch
        self._results: deque[_StepHandle] = deque()  # submitted, result not taken yet
        self._awaiting: _StepHandle | None = None  # forward done, sampling waits for provide_bitmasks
        self._bitmasks = BitmaskApplier(device)
        # Sampling metadata of the last step, reused while the sampling rows and their params
        # are unchanged and nothing in it depends on the output so far (no penalties / seeds / min_tokens).
        self._md_cache: tuple[tuple[bytes, bytes], SamplingMetadata] | None = None
        self.stats = RunnerStats()
        # Speculative decoding: steps run synchronously (EngineCore keeps one in flight), the
        # proposer drafts on the host's tokens after each step. Draft distributions of the drafts
        # handed out last step, per request (draft model, sampled requests only).
        self.spec = speculative_config
        self.ngram: NgramProposer | None = None
        self.drafter: DraftModelProposer | None = None
        self._draft_q: dict[str, tuple[list[int], torch.Tensor]] = {}
        if self.spec is not None and self.spec.method == "ngram":
            self.ngram = NgramProposer(self.spec.num_speculative_tokens, self.spec.prompt_lookup_min,
                                       self.spec.prompt_lookup_max)
        elif self.spec is not None:
            dc = draft_model_config
            draft_kv = self._allocate_kv_caches(dc, num_blocks, block_size, dc.num_key_value_heads,
                                                kv_dtype or dtype, device)
            self.drafter = DraftModelProposer(draft_model, draft_kv, block_size, self.spec.num_speculative_tokens,
                                              device, self.generator)

    @staticmethod
    def _allocate_kv_caches(mc: ModelConfig, num_blocks: int, block_size: int, num_kv_heads: int,
                            dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(2, num_blocks, block_size, num_kv_heads, mc.head_dim, dtype=dtype, device=device)
                for _ in range(mc.num_hidden_layers)]

    @staticmethod
    def kv_bytes_per_block(mc: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * mc.num_hidden_layers * block_size * (num_kv_heads or mc.num_key_value_heads) * mc.head_dim * elem

    # ------------------------------------------------------------------ Executor-facing API
    @torch.inference_mode()
    def submit(self, so: SchedulerOutput) -> None:
        t0 = time.perf_counter()
        with self._lock:
            if self._awaiting is not None:
                raise RuntimeError(f"step {so.step_id} submitted before the bitmasks of step "
                                   f"{self._awaiting.step_id}")
            # Every step but the newest must be on the host before this one's inputs are gathered
            # (at most one token per request is ever pending).
            while len(self._unmaterialized) > 1:
                self._materialize(self._unmaterialized.popleft())
            self._apply_deltas(so)
            if so.is_empty:
                handle = _StepHandle(so.step_id, [], np.empty(0, np.int64), np.empty(0, np.int64),
                                     np.empty(0, np.int64), [], None, None, None, t0, materialized=True)
            else:
                if so.scheduled_spec_decode_tokens and self.spec is None:
                    raise ExecutorError(f"step {so.step_id} has draft tokens, but this executor runs "
                                        "without --speculative-config")
                handle = self._run_spec(so, t0) if self.spec is not None else self._run(so, t0)
                if handle.sampled_device is not None:
                    self._unmaterialized.append(handle)
                elif handle.awaiting_bitmasks is not None:
                    self._awaiting = handle
                else:
                    handle.materialized = True
            self._results.append(handle)
        self.stats.steps += 1
        self.stats.submit_s += time.perf_counter() - t0

    @torch.inference_mode()
    def provide_bitmasks(self, step_id: int, bitmasks: dict[str, np.ndarray]) -> None:
        """Sample a step submitted with bitmasks_deferred, under its grammar bitmasks."""
        with self._lock:
            handle = self._awaiting
            if handle is None or handle.step_id != step_id:
                raise RuntimeError(f"provide_bitmasks({step_id}): no step is waiting for bitmasks with that id")
            self._awaiting = None
            self._sample_step(handle, *handle.awaiting_bitmasks, bitmasks)
            self._unmaterialized.append(handle)
            handle.sampled.set()

    def get_result(self) -> ModelRunnerOutput:
        if not self._results:
            raise RuntimeError("get_result() without a submitted step")
        handle = self._results[0]
        if handle.awaiting_bitmasks is not None and not handle.sampled.wait(timeout=300.0):
            # (The executor service's result thread may get here before provide_bitmasks ran.)
            raise RuntimeError(f"get_result(): step {handle.step_id} got no bitmasks")
        t = time.perf_counter()
        handle.wait()  # outside the lock: submit of the next step goes on meanwhile
        self.stats.wait_s += time.perf_counter() - t
        with self._lock:
            while self._unmaterialized and not handle.materialized:
                self._materialize(self._unmaterialized.popleft())
            self._results.popleft()
            return self._output(handle)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(so)
        return self.get_result()

    def abandon_in_flight(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with self._lock:
            if self._awaiting is not None:
                self._awaiting.sampled.set()  # wake a get_result waiting for its bitmasks
            self._unmaterialized.clear()
            self._results.clear()
            self._awaiting = None

    def reset(self) -> None:
        self.abandon_in_flight()
        with self._lock:
            self.batch = InputBatch(self.block_size, self.batch.max_model_len, initial_rows=len(self.batch.params))
            self._md_cache = None
            self._draft_q.clear()

    # ------------------------------------------------------------------ state from deltas
    def _apply_deltas(self, so: SchedulerOutput) -> None:
        b = self.batch
        for rid in so.finished_req_ids:
            b.remove(rid)
            self._draft_q.pop(rid, None)
        for src, dst in so.block_copies:
            for kv in self.kv_caches:
                raw = raw_kv_view(kv)  # CPU fp8 has no indexing kernels
                raw[:, dst].copy_(raw[:, src])
        for new in so.scheduled_new_reqs:
            b.add(new)
        for cached in so.scheduled_cached_reqs:
            b.append_blocks(cached.req_id, cached.num_computed_tokens, cached.new_block_ids, cached.replaced_blocks)

    # ------------------------------------------------------------------ one step
    def _run(self, so: SchedulerOutput, t0: float) -> _StepHandle:
        prev = self._unmaterialized[-1] if self._unmaterialized else None
        inputs = self.batch.prepare(so, prev.rows if prev else None, prev.generations if prev else None)
        ids, pos, md, logits_rows = self._prepare_inputs(inputs, prev)
        hidden = self._forward(ids, pos, md)
        b = self.batch
        rows = inputs.rows[inputs.sample_idx]
        gens = b.generation[rows].copy()
        num_lp = [b.params[r].logprobs for r in rows.tolist()]
        handle = _StepHandle(so.step_id, inputs.req_ids, inputs.sample_idx, rows, gens, num_lp, None, None, None, t0)
        if not len(rows):
            return handle
        # Logits and sampling metadata now (the metadata counts this step's pending tokens as of
        # submit); only masking + sampling wait when the grammar bitmasks are deferred.
        logits = self.model.compute_logits(hidden.index_select(0, logits_rows))
        md = self._sampling_metadata(inputs, rows, ids, logits_rows)
        masked_idx = inputs.req_ids, inputs.sample_idx
        if so.bitmasks_deferred:
            handle.awaiting_bitmasks = (logits, md, masked_idx)
            return handle
        self._sample_step(handle, logits, md, masked_idx, so.grammar_bitmasks)
        return handle

    def _sample_step(self, handle: _StepHandle, logits: torch.Tensor, md: SamplingMetadata,
                     masked_idx: tuple[list[str], np.ndarray], grammar_bitmasks: dict[str, np.ndarray]) -> None:
        """Structured-output rows get their grammar's bitmask (-inf on forbidden tokens), then the
        batched sampler runs (no host sync)."""
        self._apply_grammar_bitmasks(logits, *masked_idx, grammar_bitmasks)
        result = self.sampler(logits, md)
        # The sampled ids (and logprobs) start their copy to pinned host memory now; the event
        # tells get_result when they are there. The device tensor feeds the next step's inputs.
        handle.host = SamplerOutput(*(_to_host_async(t) for t in (result.sampled_token_ids, result.logprobs,
                                                                  result.logprob_token_ids, result.ranks)))
        if self.device.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        handle.sampled_device = result.sampled_token_ids

    def _apply_grammar_bitmasks(self, logits: torch.Tensor, req_ids: list[str], sample_idx: np.ndarray,
                                bitmasks: dict[str, np.ndarray]) -> None:
        """Logits row i samples for req_ids[sample_idx[i]]: rows under a grammar get -inf on the
        tokens their bitmask forbids."""
        if not bitmasks:
            return
        masked = [(i, bitmasks[req_ids[b]]) for i, b in enumerate(sample_idx.tolist()) if req_ids[b] in bitmasks]
        if masked:
            self._bitmasks.apply(logits, np.stack([m for _, m in masked]), [i for i, _ in masked])

    def _prepare_inputs(self, x: StepInputs, prev: _StepHandle | None):
        """Host numpy -> device: one pinned buffer per dtype, one non-blocking copy each."""
        dev = self.device
        T, B = x.input_ids.size, x.rows.size
        # Segments padded to 16 bytes: a misaligned view would make Triton compile another variant.
        T2, B4 = T + T % 2, -(-(B + 1) // 4) * 4
        i64 = np.zeros(3 * T2 + x.logits_rows.size + 2 * x.pending_flat.size, dtype=np.int64)
        i64[:T], i64[T2:T2 + T], i64[2 * T2:2 * T2 + T] = x.input_ids, x.positions, x.slot_mapping
        i64[3 * T2:] = np.concatenate([x.logits_rows, x.pending_flat, x.pending_src])
        i32 = np.zeros(2 * B4 + x.block_tables.size, dtype=np.int32)
        i32[:B + 1], i32[B4:B4 + B] = x.query_start_loc, x.seq_lens
        i32[2 * B4:] = x.block_tables.reshape(-1)
        on_cuda = dev.type == "cuda"
        h64 = torch.from_numpy(i64)
        h32 = torch.from_numpy(i32)
        if on_cuda:
            h64 = torch.empty(i64.shape, dtype=torch.int64, pin_memory=True).copy_(h64)
            h32 = torch.empty(i32.shape, dtype=torch.int32, pin_memory=True).copy_(h32)
        d64 = h64.to(dev, non_blocking=True)
        d32 = h32.to(dev, non_blocking=True)
        S, P = x.logits_rows.size, x.pending_flat.size
        ids = d64[:T]
        pos = d64[T2:T2 + T]
        slots = d64[2 * T2:2 * T2 + T]
        logits_rows = d64[3 * T2:3 * T2 + S]
        if P:
            # Tokens the previous step is sampling: taken on the device, never through the host.
            o = 3 * T2 + S
            ids[d64[o:o + P]] = prev.sampled_device.index_select(0, d64[o + P:o + 2 * P])
        mb = x.block_tables.shape[1]
        md = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=d32[:B + 1],
            seq_lens=d32[B4:B4 + B],
            block_tables=d32[2 * B4:].view(B, mb),
            block_size=self.block_size,
            max_query_len=int(x.query_lens.max()),
            max_seq_len=int(x.seq_lens.max()),
            query_lens_cpu=x.query_lens.tolist(),
            seq_lens_cpu=x.seq_lens.tolist(),
            num_decodes=x.num_decodes,
        )
        return ids, pos, md, logits_rows

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        if self.graph_runner is not None and self.graph_runner.can_run(md):
            return self.graph_runner.run(ids, pos, md)
        return self.model(ids, pos, self.kv_caches, md)

    def _sampling_metadata(self, x: StepInputs, rows: np.ndarray, ids: torch.Tensor,
                           logits_rows: torch.Tensor) -> SamplingMetadata:
        b = self.batch
        row_list = rows.tolist()
        stateless = bool(b.stateless[rows].all())
        key = (rows.tobytes(), b.generation[rows].tobytes())
        if stateless and self._md_cache is not None and self._md_cache[0] == key:
            return self._md_cache[1]
        params = [b.params[r] for r in row_list]
        pending = x.num_pending
        num_out = (b.num_tokens[rows] - b.prompt_len[rows] + pending).tolist()
        generators = [None if p.seed is None else make_generator(p.seed, n, self.device)
                      for p, n in zip(params, num_out)]
        md = SamplingMetadata.build(
            params=params,
            output_token_ids=[b.output_token_ids(r) for r in row_list],
            prompt_token_ids=[b.prompt_token_ids(r) for r in row_list],
            generators=generators,
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
            default_generator=self.generator,
            num_output_tokens=num_out,
        )
        if md.output_token_counts is not None and pending.any():
            # Penalties count the output token still on the device too: a pending row computes just
            # that token, so it is this step's input at the row's logits position.
            srows = torch.from_numpy(np.flatnonzero(pending)).to(self.device)
            toks = ids.index_select(0, logits_rows.index_select(0, srows))
            md.output_token_counts.index_put_((srows, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)
        self._md_cache = (key, md) if stateless else None
        return md

    # ------------------------------------------------------------------ speculative decoding
    def _run_spec(self, so: SchedulerOutput, t0: float) -> _StepHandle:
        """A step with speculative decoding on, run to the end here (the host needs the accepted
        tokens to roll back rejected positions and to draft the next step). Requests that verify
        drafts go through the rejection sampler; the others (no draft this step, logprobs,
        structured output) through the normal sampler, exactly as without speculation."""
        inputs = self.batch.prepare(so, None, None)
        ids, pos, md_attn, logits_rows = self._prepare_inputs(inputs, None)
        # Decodes and verifications only: run them as decode rows (the decode kernel, and its CUDA
        # graphs when the rows fit the captured sizes) instead of the eager chunked-prefill path.
        max_rows = self.graph_runner.max_bs if self.graph_runner is not None else 1 << 30
        rows_md = as_decode_rows(md_attn, max_rows, self.spec.num_speculative_tokens + 1)
        hidden = self._forward(ids, pos, rows_md if rows_md is not None else md_attn)
        if self.drafter is not None:
            self.drafter.mirror(ids, pos, md_attn)
        b = self.batch
        rows = inputs.rows[inputs.sample_idx]
        num_lp = [b.params[r].logprobs for r in rows.tolist()]
        handle = _StepHandle(so.step_id, inputs.req_ids, inputs.sample_idx, rows, b.generation[rows].copy(),
                             num_lp, None, None, None, t0)
        S = len(rows)
        if not S:
            return handle
        nspec = inputs.num_spec if inputs.num_spec is not None else np.zeros(S, dtype=np.int64)
        tokens: list[list[int]] = [[] for _ in range(S)]
        logprobs: list[list | None] = [None] * S
        plain = np.flatnonzero(nspec == 0)
        if plain.size:
            lr = logits_rows.index_select(0, torch.from_numpy(plain).to(self.device))
            logits = self.model.compute_logits(hidden.index_select(0, lr))
            x = dataclasses.replace(inputs, num_pending=np.zeros(plain.size, dtype=np.int64))
            md = self._sampling_metadata(x, rows[plain], ids, lr)
            self._apply_grammar_bitmasks(logits, inputs.req_ids, inputs.sample_idx[plain], so.grammar_bitmasks)
            res = self.sampler(logits, md).cpu()
            lps = res.to_token_logprobs([num_lp[s] for s in plain.tolist()])
            for i, (s, tok) in enumerate(zip(plain.tolist(), res.sampled_token_ids.tolist())):
                tokens[s] = [tok]
                logprobs[s] = None if lps[i] is None else [lps[i]]
        verify = np.flatnonzero(nspec > 0)
        if verify.size:
            for s, toks in zip(verify.tolist(), self._verify(inputs, hidden, rows[verify], nspec[verify],
                                                             verify)):
                tokens[s] = toks
        for s in range(S):
            b.append_tokens(int(rows[s]), tokens[s], int(nspec[s]) - (len(tokens[s]) - 1))
        handle.tokens = [t[-1] for t in tokens]
        handle.token_lists, handle.logprob_lists = tokens, logprobs
        handle.draft_lists = self._propose([inputs.req_ids[i] for i in inputs.sample_idx.tolist()], rows)
        return handle

    def _verify(self, x: StepInputs, hidden: torch.Tensor, rows: np.ndarray, nspec: np.ndarray,
                sample_pos: np.ndarray) -> list[list[int]]:
        """Target distributions at each verifying request's k+1 positions (the sampling params
        apply per position, penalties counting the earlier drafts as output), then rejection sampling."""
        b = self.batch
        last = x.logits_rows[sample_pos]
        flat = np.concatenate([np.arange(e - k, e + 1) for e, k in zip(last.tolist(), nspec.tolist())])
        logits = self.model.compute_logits(hidden.index_select(0, torch.from_numpy(flat).to(self.device)))
        params, outs, prompts, num_out, drafts, greedy, gens, qs = [], [], [], [], [], [], [], []
        req_ids = [x.req_ids[x.sample_idx[s]] for s in sample_pos.tolist()]
        for rid, row, k in zip(req_ids, rows.tolist(), nspec.tolist()):
            p = b.params[row]
            out = b.output_token_ids(row)
            n = int(b.num_tokens[row])
            d = b.token_ids[row, n: n + k].tolist()
            drafts.append(d)
            greedy.append(p.temperature < GREEDY_EPS)
            gens.append(None if p.seed is None else make_generator(p.seed, len(out), self.device))
            stored = self._draft_q.pop(rid, None)
            qs.append(stored[1] if stored is not None and stored[0][:k] == d else None)
            for j in range(k + 1):
                params.append(p)
                outs.append(np.concatenate([out, np.asarray(d[:j], dtype=out.dtype)]) if j else out)
                prompts.append(b.prompt_token_ids(row))
                num_out.append(len(out) + j)
        md = SamplingMetadata.build(params=params, output_token_ids=outs, prompt_token_ids=prompts,
                                    generators=[None] * len(params), vocab_size=self.vocab_size,
                                    device=self.device, eos_token_ids=self.eos_token_ids,
                                    default_generator=self.generator, num_output_tokens=num_out)
        probs, argmax = target_distribution(logits, md)
        return rejection_sample(drafts, probs, argmax, greedy, qs if self.drafter is not None else None,
                                gens, self.generator)

    def _propose(self, req_ids: list[str], rows: np.ndarray) -> list[list[int]]:
        """Drafts for each sampling request's next step: none for logprobs / structured-output
        requests (documented), at most k, and never more than max_tokens / max_model_len leave
        room for (the scheduler caps again with what it knows: budget, stop)."""
        b, k = self.batch, self.spec.num_speculative_tokens
        drafts: list[list[int]] = [[] for _ in rows]
        todo: list[tuple[int, str, int, int]] = []
        for s, (rid, row) in enumerate(zip(req_ids, rows.tolist())):
            p = b.params[row]
            if p is None or p.logprobs is not None or p.structured_outputs is not None:
                continue
            n = int(b.num_tokens[row])
            n_out = n - int(b.prompt_len[row])
            cap = min(k, self.batch.max_model_len - n - 1)
            if p.max_tokens is not None:
                cap = min(cap, p.max_tokens - n_out - 1)
            if self.drafter is not None:  # the draft passes write KV at positions n-1 .. n-2+cap
                cap = min(cap, int(b.num_blocks[row]) * self.block_size - (n - 1))
            if cap > 0:
                todo.append((s, rid, row, cap))
        if self.ngram is not None:
            for s, _, row, cap in todo:
                drafts[s] = self.ngram.propose(b.token_ids[row, : int(b.num_tokens[row])], cap)
        elif todo:
            reqs = [DraftRequest(last_token=int(b.token_ids[row, int(b.num_tokens[row]) - 1]),
                                 position=int(b.num_tokens[row]) - 1,
                                 block_table=b.block_table[row, : int(b.num_blocks[row])],
                                 num_drafts=cap, params=b.params[row],
                                 num_output_tokens=int(b.num_tokens[row] - b.prompt_len[row]))
                    for _, _, row, cap in todo]
            out, qs = self.drafter.propose(reqs)
            for (s, rid, _, _), d, q in zip(todo, out, qs):
                drafts[s] = d
                if q is not None:
                    self._draft_q[rid] = (d, q)
        return drafts

    # ------------------------------------------------------------------ results
    def _materialize(self, handle: _StepHandle) -> None:
        """Put a finished step's sampled ids into the input batch (host)."""
        handle.wait()
        if handle.host is not None:
            handle.tokens = handle.host.sampled_token_ids.tolist()
            self.batch.append_sampled(handle.rows, handle.generations,
                                      handle.host.sampled_token_ids.numpy())
        handle.materialized = True

    def _output(self, handle: _StepHandle) -> ModelRunnerOutput:
        out = ModelRunnerOutput(step_id=handle.step_id, req_ids=list(handle.req_ids))
        n = len(handle.req_ids)
        out.sampled_token_ids = [[] for _ in range(n)]
        out.logprobs = [None] * n
        if handle.token_lists is not None:
            out.spec_token_ids = [[] for _ in range(n)]
            for s, i in enumerate(handle.sample_idx.tolist()):
                out.sampled_token_ids[i] = handle.token_lists[s]
                out.logprobs[i] = handle.logprob_lists[s]
                out.spec_token_ids[i] = handle.draft_lists[s]
        elif handle.host is not None:
            lps = handle.host.to_token_logprobs(handle.num_logprobs)
            for i, tok, lp in zip(handle.sample_idx.tolist(), handle.tokens, lps):
                out.sampled_token_ids[i] = [tok]
                out.logprobs[i] = None if lp is None else [lp]
        out.execute_time_s = time.perf_counter() - handle.t0
        return out

