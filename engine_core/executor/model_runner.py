"""Model runner: owns the KV cache tensors and per-request state, turns a SchedulerOutput of deltas
into model inputs (token ids, positions, slot mapping, block tables), runs the model and samples.

Batch order is decode-first (requests computing exactly one token come first) so attention can
run all decodes as one batched call and prefill chunks separately.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine_core.executor.base import ExecutorError
from engine_core.executor.cuda_graph import CudaGraphRunner
from engine_core.executor.request_state import CachedRequestState
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.layers.sampler import Sampler, SamplerOutput, make_generator
from engine_core.model_config import ModelConfig
from engine_core.sampling_metadata import SamplingMetadata
from engine_core.scheduler_output import (
    ModelRunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, *, device: torch.device,
                 dtype: torch.dtype, block_size: int, num_blocks: int, seed: int = 0,
                 cuda_graphs: bool = False, max_num_seqs: int = 256, max_model_len: int = 8192,
                 num_kv_heads: int | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = model_config.vocab_size
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        # Unseeded requests draw from one engine generator, so a run with a fixed engine seed
        # is reproducible as a whole.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        mc = model_config
        # KV heads held here: all of the model's, or this tensor-parallel rank's share.
        self.num_kv_heads = num_kv_heads or mc.num_key_value_heads
        # One tensor per layer: [2 (K,V), num_blocks, block_size, num_kv_heads, head_dim]. Zeroed so
        # padded gathers never read NaN garbage.
        self.kv_caches = [
            torch.zeros(2, num_blocks, block_size, self.num_kv_heads, mc.head_dim, dtype=dtype, device=device)
            for _ in range(mc.num_hidden_layers)
        ]
        self.graph_runner: CudaGraphRunner | None = None
        if cuda_graphs and device.type == "cuda":
            self.graph_runner = CudaGraphRunner(model, self.kv_caches, max_num_seqs=max_num_seqs,
                                                max_model_len=max_model_len, block_size=block_size, device=device)
            self.graph_runner.capture()

    @staticmethod
    def kv_bytes_per_block(mc: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * mc.num_hidden_layers * block_size * (num_kv_heads or mc.num_key_value_heads) * mc.head_dim * elem

    # ------------------------------------------------------------------ state from deltas
    def _apply_deltas(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for src, dst in so.block_copies:
            for kv in self.kv_caches:
                kv[:, dst].copy_(kv[:, src])
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                output_token_ids=list(new.output_token_ids),
            )
        for cached in so.scheduled_cached_reqs:
            st = self.requests.get(cached.req_id)
            if st is None:
                raise ExecutorError(f"executor has no state for request {cached.req_id!r} (out of sync)")
            if st.num_computed_tokens != cached.num_computed_tokens:
                raise ExecutorError(
                    f"request {cached.req_id!r}: executor has {st.num_computed_tokens} computed tokens, "
                    f"scheduler says {cached.num_computed_tokens}")
            st.block_ids.extend(cached.new_block_ids)

    def reset(self) -> None:
        self.requests.clear()

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        self._apply_deltas(so)
        if so.is_empty:
            return ModelRunnerOutput(step_id=so.step_id)
        # Decode-first order (stable within each group).
        req_ids = sorted(so.num_scheduled_tokens, key=lambda r: so.num_scheduled_tokens[r] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []  # row in the flattened batch whose logits we sample from
        sample_states: list[CachedRequestState] = []
        bs = self.block_size
        for rid in req_ids:
            st = self.requests.get(rid)
            if st is None:
                raise ExecutorError(f"request {rid!r} scheduled but unknown to the executor")
            n = so.num_scheduled_tokens[rid]
            start = st.num_computed_tokens
            end = start + n
            if end > st.num_tokens:
                raise ExecutorError(f"request {rid!r}: {n} tokens scheduled at {start}, only {st.num_tokens} known")
            if -(-end // bs) > len(st.block_ids):
                raise ExecutorError(f"request {rid!r}: {end} tokens need more than its {len(st.block_ids)} blocks")
            input_ids.extend(st.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = st.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(blocks)
            if end == st.num_tokens:  # every known token is computed: the last row predicts the next
                sample_rows.append(len(input_ids) - 1)
                sample_states.append(st)

        dev = self.device
        max_blocks = max(len(t) for t in tables)
        # Padded with the null block 0; one tensor built per step, not one per request.
        table_tensor = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=table_tensor.to(dev, non_blocking=True),
            block_size=bs,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_decodes=sum(1 for q in query_lens if q == 1),
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        if self.graph_runner is not None and self.graph_runner.can_run(md):
            hidden = self.graph_runner.run(ids_t, pos_t, md)
        else:
            hidden = self.model(ids_t, pos_t, self.kv_caches, md)

        sampled: dict[str, tuple[list[int], list[TokenLogprobs] | None]] = {}
        if sample_rows:
            rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            result = self.sampler(logits, self._sampling_metadata(sample_states))
            sampled = self._to_host(sample_states, result)
        for rid in req_ids:
            self.requests[rid].num_computed_tokens += so.num_scheduled_tokens[rid]
        out = ModelRunnerOutput(step_id=so.step_id)
        for rid in req_ids:
            toks, lps = sampled.get(rid, ([], None))
            out.req_ids.append(rid)
            out.sampled_token_ids.append(toks)
            out.logprobs.append(lps)
        out.execute_time_s = time.perf_counter() - t0
        return out

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        generators = []
        for st in states:
            seed = st.sampling_params.seed
            # Derived from (seed, tokens generated so far): a preempted or replayed request
            # samples exactly the same tokens again.
            generators.append(None if seed is None else
                              make_generator(seed, len(st.output_token_ids), self.device))
        return SamplingMetadata.build(
            params=[st.sampling_params for st in states],
            output_token_ids=[st.output_token_ids for st in states],
            prompt_token_ids=[st.prompt_token_ids for st in states],
            generators=generators,
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=list(self.model_config.eos_token_ids),
            default_generator=self.generator,
        )

    def _to_host(self, states: list[CachedRequestState], result: SamplerOutput):
        # One device->host copy per tensor per step, not one per request.
        host = result.cpu()
        tokens = host.sampled_token_ids.tolist()
        logprobs = host.to_token_logprobs([st.sampling_params.logprobs for st in states])
        out = {}
        for st, tok, lps in zip(states, tokens, logprobs):
            st.append_output(tok)
            out[st.req_id] = ([tok], None if lps is None else [lps])
        return out
