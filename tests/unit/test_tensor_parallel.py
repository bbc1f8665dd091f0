"""Tensor parallelism on CPU (gloo; device="cpu" even where CUDA exists, see tests/gpu for NCCL): MultiprocExecutor with N worker processes gives the same greedy
tokens as the single-device LocalExecutor.

- sharding rules and per-rank weight slices (no processes): Q heads split, KV heads split or
  replicated, row-parallel input columns, vocab rows padded; SmolLM2's geometry at TP=3 and TP=9
- TP=2 on a dummy Llama (8 Q / 2 KV heads, 4 layers, vocab not divisible by 2), batched prompts,
  chunked prefill, a seeded random-sampling request; per-rank KV geometry in describe()
- TP=2 with fewer KV heads than ranks (4 Q / 1 KV: the KV head is replicated), built the way the
  executor service builds it (its CLI flags, its default factory, on another thread)
- TP=2 from an HF safetensors directory (Qwen2: q/k/v biases), each rank reading only its slices
- SmolLM2-135M from the GGUF at TP=3 (9 Q heads, 3 KV heads). Its TP=2 is impossible (9 heads do
  not split in two) and gives the clear ValueError; its replication path (TP=9) is covered by
  the weight-slice test only (9 processes on a 2-core CI box cost too much)
- a worker killed mid-generation: the engine replays on fresh workers, same tokens; workers are
  gone after shutdown, and exit by themselves when their parent is SIGKILLed
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine_core.distributed import (
    TPGroup,
    attention_shard,
    check_tensor_parallel,
    vocab_shard,
)
from engine_core.layers.linear import (
    LMHead,
    MergedLinear,
    QKVLinear,
    RowParallelLinear,
    VocabEmbedding,
)
from engine_core.llm import LLM
from engine_core.model_config import ModelConfig
from engine_core.sampling_params import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA_8H_2KV = {"architecture": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 301,
                "max_position_embeddings": 512, "eos_token_ids": [2]}
LLAMA_4H_1KV = {**LLAMA_8H_2KV, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
                "vocab_size": 257, "tie_word_embeddings": True}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 3], list(range(20, 70)), [42] * 19]
MAX_NEW = 12


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def dummy_configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    paths = {}
    for name, cfg in (("llama_8h_2kv", LLAMA_8H_2KV), ("llama_4h_1kv", LLAMA_4H_1KV)):
        (d / f"{name}.json").write_text(json.dumps(cfg))
        paths[name] = f"dummy:{d / name}.json"
    return paths


# ---------------------------------------------------------------------------------------------
# Sharding rules and weight slices, in one process
# ---------------------------------------------------------------------------------------------
def test_sharding_rules():
    s = attention_shard(8, 2, 2, rank=1)
    assert (s.num_heads, s.num_kv_heads, s.q_head_start, s.kv_head_start, s.kv_replicas) == (4, 1, 4, 1, 1)
    s = attention_shard(4, 1, 2, rank=1)  # fewer KV heads than ranks: replicated
    assert (s.num_heads, s.num_kv_heads, s.kv_head_start, s.kv_replicas) == (2, 1, 0, 2)
    for rank in range(9):  # SmolLM2 at TP=9: rank r has Q head r, which uses KV head r // 3
        s = attention_shard(9, 3, 9, rank)
        assert (s.num_heads, s.num_kv_heads, s.kv_head_start, s.kv_replicas) == (1, 1, rank // 3, 3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 must divide num_attention_heads \(9\)"):
        attention_shard(9, 3, 2)
    with pytest.raises(ValueError, match=r"must divide num_key_value_heads \(4\)"):
        attention_shard(12, 4, 3)  # 4 Q heads per rank would straddle KV groups
    with pytest.raises(ValueError, match="must divide tensor_parallel_size"):
        attention_shard(12, 4, 6)
    cfg = ModelConfig.from_dict({**LLAMA_8H_2KV, "intermediate_size": 130})
    with pytest.raises(ValueError, match=r"intermediate_size \(130\)"):
        check_tensor_parallel(cfg, 4)
    assert vocab_shard(301, 2, 1) == (151, 151, 150)  # the last rank's tail row is padding
    smollm2 = ModelConfig.from_dict({**LLAMA_8H_2KV, "hidden_size": 576, "intermediate_size": 1536,
                                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64})
    check_tensor_parallel(smollm2, 3)  # SmolLM2's only size > 1: 9 Q heads, 3 KV heads, 1536 MLP
    with pytest.raises(ValueError, match=r"intermediate_size \(1536\)"):
        check_tensor_parallel(smollm2, 9)


@pytest.mark.parametrize("tp_size", [3, 9])
def test_rank_slices_smollm2_geometry(tp_size):
    """Every rank's QKV rows are its Q heads and the KV head(s) they use; o_proj/down_proj take
    the matching input columns; gate_up both halves' rows; vocab rows padded. SmolLM2's attention
    (9 Q / 3 KV heads, head_dim 64); its real intermediate size 1536 does not split 9 ways, so
    SmolLM2 itself only runs at TP=3 and TP=9 (KV replication) uses 1152 here."""
    hidden, d, hq, hkv, vocab = 576, 64, 9, 3, 49152 + 5
    inter = 1536 if tp_size == 3 else 1152
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * d, hidden, generator=g) for n in (hq, hkv, hkv))
    o = torch.randn(hidden, hq * d, generator=g)
    gate, up = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    emb = torch.randn(vocab, hidden, generator=g)
    rows = []
    for rank in range(tp_size):
        tp = TPGroup(rank=rank, world_size=tp_size, group=object())  # no collective is called here
        qkv = QKVLinear(hidden, d, hq, hkv, tp=tp)
        for shard, w in (("q", q), ("k", k), ("v", v)):
            qkv.weight.weight_loader(qkv.weight, w, shard)
        s = attention_shard(hq, hkv, tp_size, rank)
        want = torch.cat([q[s.q_head_start * d:(s.q_head_start + s.num_heads) * d],
                          k[s.kv_head_start * d:(s.kv_head_start + s.num_kv_heads) * d],
                          v[s.kv_head_start * d:(s.kv_head_start + s.num_kv_heads) * d]])
        assert torch.equal(qkv.weight, want)
        for q_head in range(s.q_head_start, s.q_head_start + s.num_heads):  # GQA group stays local
            assert s.kv_head_start <= q_head // (hq // hkv) < s.kv_head_start + s.num_kv_heads
        row = RowParallelLinear(hq * d, hidden, tp=tp)
        row.weight.weight_loader(row.weight, o)
        assert torch.equal(row.weight, o[:, s.q_head_start * d:(s.q_head_start + s.num_heads) * d])
        gu = MergedLinear(hidden, [inter, inter], tp=tp)
        gu.weight.weight_loader(gu.weight, gate, 0)
        gu.weight.weight_loader(gu.weight, up, 1)
        n = inter // tp_size
        assert torch.equal(gu.weight, torch.cat([gate[rank * n:(rank + 1) * n], up[rank * n:(rank + 1) * n]]))
        fused = MergedLinear(hidden, [inter, inter], tp=tp)  # a whole fused tensor (dummy weights)
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))
        assert torch.equal(fused.weight, gu.weight)
        e = VocabEmbedding(vocab, hidden, tp=tp)
        e.weight.weight_loader(e.weight, emb)
        head = LMHead(hidden, vocab, tp=tp)
        head.weight = e.weight  # tied: same sharding
        rows.append(e.weight)
    full = torch.cat(rows)
    assert torch.equal(full[:vocab], emb) and not full[vocab:].any()  # padding rows are zero


# ---------------------------------------------------------------------------------------------
# Real worker processes (gloo)
# ---------------------------------------------------------------------------------------------
def test_tp2_dummy_llama_matches_tp1(dummy_configs):
    model = dummy_configs["llama_8h_2kv"]
    kw = {"device": "cpu", "max_model_len": 128, "kv_cache_memory_gb": 0.01, "max_num_batched_tokens": 32}  # 50-token prompt: chunked
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
    params = [_greedy()] * len(PROMPTS) + [seeded]
    prompts = [*PROMPTS, PROMPTS[0]]
    ref = LLM(model, **kw)
    want = _tokens(ref, prompts, params)
    want_lp = ref.generate([prompts[-1]], seeded, use_tqdm=False)[0].outputs[0].logprobs
    llm = LLM(model, tensor_parallel_size=2, **kw)
    ex = llm.engine.core.executor
    try:
        assert type(ex).__name__ == "MultiprocExecutor"
        info = ex.describe()
        assert info.num_kv_heads == 1 and info.device == "cpu,cpu"  # 2 KV heads split: 1 per rank
        assert [i.num_kv_blocks for i in ex.rank_infos] == [info.num_kv_blocks] * 2
        assert info.kv_cache_bytes == sum(i.kv_cache_bytes for i in ex.rank_infos)
        assert _tokens(llm, prompts, params) == want
        got_lp = llm.generate([prompts[-1]], seeded, use_tqdm=False)[0].outputs[0].logprobs
        assert [x.token_id for x in got_lp] == [x.token_id for x in want_lp]
        assert [x.logprob for x in got_lp] == pytest.approx([x.logprob for x in want_lp], abs=1e-4)
        assert 0 < ex.last_step_bytes < 2000  # a decode step's delta, pickled once for both ranks
        ex.reset()
        pids = ex.worker_pids
    finally:
        llm.engine.shutdown()
    assert all(_gone(p) for p in pids)
    assert not [c for c in multiprocessing.active_children() if c.pid in pids]


def test_tp2_replicated_kv_head_via_executor_service_flags(dummy_configs):
    """4 Q heads / 1 KV head over 2 ranks: both hold the KV head. Built as `python -m
    services.executor MODEL --tensor-parallel-size 2` builds it: parsed flags, the default
    factory, constructed on a non-main thread."""
    from engine_core.config import EngineConfig
    from engine_core.llm_engine import LLMEngine
    from services.executor.server import DEFAULT_EXECUTOR, _load_factory, build_parser

    model = dummy_configs["llama_4h_1kv"]
    argv = [model, "--tensor-parallel-size", "2", "--device", "cpu", "--max-model-len", "128",
            "--kv-cache-memory-gb", "0.01"]
    args = build_parser().parse_args(argv)
    config = EngineConfig.from_cli_args(args, model=args.model_pos)
    assert config.tensor_parallel_size == 2
    built = {}
    t = threading.Thread(target=lambda: built.update(ex=_load_factory(DEFAULT_EXECUTOR)(config)))
    t.start()
    t.join(120)
    ex = built["ex"]
    try:
        assert type(ex).__name__ == "MultiprocExecutor" and ex.describe().num_kv_heads == 1
        engine = LLMEngine(config, executor=ex)
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, _greedy())
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
    finally:
        ex.shutdown()
    ref = LLM(model, device="cpu", max_model_len=128, kv_cache_memory_gb=0.01)
    assert [got[str(i)] for i in range(len(PROMPTS))] == _tokens(ref, PROMPTS, _greedy())


def test_tp2_safetensors_qwen2_reads_slices(tmp_path):
    from tests.unit.test_models import make_hf_tiny

    hf = make_hf_tiny("qwen2")  # 4 Q / 2 KV heads, q/k/v biases, untied head
    hf.save_pretrained(tmp_path, safe_serialization=True)
    kw = {"device": "cpu", "max_model_len": 128, "kv_cache_memory_gb": 0.01}
    want = _tokens(LLM(str(tmp_path), **kw), PROMPTS, _greedy())
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **kw)
    try:
        assert _tokens(llm, PROMPTS, _greedy()) == want
    finally:
        llm.engine.shutdown()


def test_smollm2_gguf_tp3_matches_tp1():
    kw = {"device": "cpu", "max_model_len": 128, "kv_cache_memory_gb": 0.02}
    prompts = [[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 28], [504, 2365, 6354, 16438, 27003], list(range(300, 340))]
    want = _tokens(LLM(**kw), prompts, _greedy())
    llm = LLM(tensor_parallel_size=3, **kw)
    try:
        assert llm.engine.core.executor.describe().num_kv_heads == 1  # 3 KV heads, one per rank
        assert _tokens(llm, prompts, _greedy()) == want
    finally:
        llm.engine.shutdown()


def test_tp_size_that_does_not_divide_the_heads_is_a_clear_error(dummy_configs):
    before = len(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 must divide num_attention_heads \(9\)"):
        LLM(device="cpu", max_model_len=128, tensor_parallel_size=2)  # SmolLM2: 9 Q heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide num_attention_heads \(8\)"):
        LLM(dummy_configs["llama_8h_2kv"], device="cpu", max_model_len=128, tensor_parallel_size=3)
    assert len(multiprocessing.active_children()) == before  # refused before any worker started
    from engine_core.config import EngineConfig
    from engine_core.executor.local import LocalExecutor

    with pytest.raises(ValueError, match="needs MultiprocExecutor"):
        LocalExecutor(EngineConfig(model=dummy_configs["llama_8h_2kv"], device="cpu", tensor_parallel_size=2))


def test_killed_worker_is_replaced_and_requests_replayed(dummy_configs):
    model = dummy_configs["llama_8h_2kv"]
    kw = {"device": "cpu", "max_model_len": 128, "kv_cache_memory_gb": 0.01}
    want = _tokens(LLM(model, **kw), PROMPTS, _greedy())
    llm = LLM(model, tensor_parallel_size=2, **kw)
    engine = llm.engine
    ex = engine.core.executor
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, _greedy())
        got, steps = {}, 0
        while engine.has_unfinished_requests():
            if steps == 3:
                victim = ex.worker_pids[1]
                os.kill(victim, signal.SIGKILL)
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
            steps += 1
        assert engine.core.counters.executor_restarts == 1
        assert victim not in ex.worker_pids and _gone(victim)
        assert [got[str(i)] for i in range(len(PROMPTS))] == want
    finally:
        engine.shutdown()


_ORPHAN_SCRIPT = """
import os, signal, sys
from engine_core.config import EngineConfig
from engine_core.executor.multiproc import MultiprocExecutor
if __name__ == "__main__":
    ex = MultiprocExecutor(EngineConfig(model=sys.argv[1], device="cpu", tensor_parallel_size=2, max_model_len=64,
                                        kv_cache_memory_gb=0.001))
    print(" ".join(map(str, ex.worker_pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_the_parent_is_killed(dummy_configs, tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), dummy_configs["llama_4h_1kv"]], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)
