"""Issue 14: messages scale with engine steps. The real stack (`pagedserve serve`, a tiny dummy model
on CPU) with 32 concurrent streaming clients: the gateway receives at most 2 scheduler messages
and sends at most 2 DetokenizeBatch messages per engine step (counted by the gateway's
`pagedserve:gateway_stream_messages_total`, steps by the scheduler's GetStats). And the CI-sized run
of benchmarks/serving_path.py (all three paths, JSON with `ratios`, a PNG) so the script cannot rot."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from benchmarks import serving_path
from benchmarks.servers import start_pagedserve
from services.gen.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.internal_auth import InternalSecurity

pytestmark = pytest.mark.timeout(600)

STREAMS = 32
TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer SmolLM2-shaped config and its synthetic byte-level tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = json.loads(serving_path.config_path("smollm2-135m-instruct").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=4096, max_position_embeddings=1024)
    (d / "config.json").write_text(json.dumps(cfg))
    tok = serving_path.synthetic_tokenizer(cfg["vocab_size"], cfg["eos_token_id"], d / "tokenizer")
    return d / "config.json", tok


def _counter(metrics: str, stream: str) -> float:
    m = re.search(rf'^pagedserve:gateway_stream_messages_total\{{stream="{stream}"\}} (\S+)$', metrics, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_messages_per_engine_step_at_32_streams(tiny, tmp_path):
    cfg, tok = tiny
    server = start_pagedserve(f"dummy:{cfg}", device="cpu", log_path=tmp_path / "stack.log",
                              extra=["--tokenizer", str(tok), "--max-model-len", "256", "--quiet"])
    try:
        url = server.wait_ready(300)
        sched = serving_path.scheduler_address(server)
        with InternalSecurity(token=server.service_token).channel(sched) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)

            def steps() -> int:
                return stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10).num_steps

            def counters() -> tuple[float, float]:
                text = httpx.get(url + "/metrics", timeout=10).text
                return _counter(text, "scheduler"), _counter(text, "detokenize")

            async def clients() -> list[int]:
                async with httpx.AsyncClient(base_url=url, timeout=120,
                                             limits=httpx.Limits(max_connections=STREAMS + 2)) as c:
                    async def one(i: int) -> int:
                        body = {"prompt": [1000 + i, 1001, 1002], "max_tokens": TOKENS, "temperature": 0,
                                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                        n = 0
                        async with c.stream("POST", "/v1/completions", json=body) as r:
                            assert r.status_code == 200
                            async for line in r.aiter_lines():
                                if '"usage":{' in line:
                                    n = json.loads(line[6:])["usage"]["completion_tokens"]
                        return n

                    return await asyncio.gather(*(one(i) for i in range(STREAMS)))

            s0, (m0, d0) = steps(), counters()
            done = asyncio.run(clients())
            s1, (m1, d1) = steps(), counters()
        assert done == [TOKENS] * STREAMS
        n_steps = s1 - s0
        assert n_steps >= TOKENS
        sched_per_step, detok_per_step = (m1 - m0) / n_steps, (d1 - d0) / n_steps
        print(f"{n_steps} steps: {sched_per_step:.2f} scheduler msgs/step, {detok_per_step:.2f} detokenize msgs/step")
        assert sched_per_step <= 2, (m1 - m0, n_steps)
        assert detok_per_step <= 2, (d1 - d0, n_steps)
        assert m1 - m0 > 0 and d1 - d0 > 0
    finally:
        server.stop()


def test_serving_path_bench_cpu(tiny, tmp_path):
    cfg, _ = tiny
    out = tmp_path / "serving_path.json"
    rc = serving_path.main(["--configs", str(cfg), "--device", "cpu", "--concurrency", "1,64", "--num-prompts", "64",
                            "--c1-prompts", "2", "--input-len", "8", "--output-len", "4", "--max-model-len", "256",
                            "--gateway-workers", "1", "--client-procs", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    name = cfg.stem
    assert set(result["ratios"][name]) == {"gateway_vs_offline_c64", "gateway_vs_offline_c256", "grpc_vs_offline_c256"}
    assert result["ratios"][name]["gateway_vs_offline_c64"] > 0
    runs = result["configs"][name]["runs"]
    assert {(r["path"], r["concurrency"]) for r in runs} == {(p, c) for p in ("offline", "grpc", "gateway")
                                                              for c in (1, 64)}
    assert all(r["output_tokens"] == r["requests"] * 4 for r in runs)
    assert {"device", "date", "command"} <= set(result)
    assert out.with_suffix(".png").stat().st_size > 0
