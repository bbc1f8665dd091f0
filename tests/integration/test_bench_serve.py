"""`pagedserve bench serve` against real servers on CPU (issue 8's acceptance):

- the whole pagedserve stack (`pagedserve serve`, embedded SmolLM2, gateway) driven for ~20 s at
  concurrency 2 and 4 (a sweep): the JSON holds every metric, the counts add up (completed ==
  prompts, output tokens == prompts x output length, exactly, thanks to ignore_eos), the latency and
  throughput plots are written; then a short chat-endpoint run on the conversation dataset;
- the naive HF baseline server (benchmarks/baselines/hf_server.py, a tiny random-weight config so it
  loads in seconds) speaks the same protocol and serves one request at a time.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import serve_bench
from benchmarks.servers import start_hf_server, start_pagedserve

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(400)
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 12, 32, 16


def bench(url: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "services.cli", "bench", "serve", "--base-url", url, *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def check_run(m: dict, num_prompts: int, output_len: int | None) -> None:
    for name in serve_bench.METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            key = f"{stat}_{name}_ms"
            assert isinstance(m[key], float) and m[key] >= 0, key
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
                "max_output_tokens_per_s"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert m["completed"] == num_prompts and m["failed"] == 0, m["errors"]
    assert m["usage_reported"] == num_prompts
    assert len(m["output_lens"]) == len(m["input_lens"]) == len(m["ttfts_s"]) == num_prompts
    assert m["total_output_tokens"] == sum(m["output_lens"])
    assert m["total_input_tokens"] == sum(m["input_lens"])
    if output_len is not None:
        assert m["output_lens"] == [output_len] * num_prompts  # ignore_eos + max_tokens: exact
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration"])
    assert m["request_throughput"] == pytest.approx(m["completed"] / m["duration"])
    assert 0 <= m["good_requests"] <= m["completed"]
    assert m["request_goodput"] == pytest.approx(m["good_requests"] / m["duration"])
    assert 0 < m["p50_ttft_ms"] <= m["p90_ttft_ms"] <= m["p99_ttft_ms"]
    assert m["p50_ttft_ms"] < m["p50_e2el_ms"]


def test_bench_serve_pagedserve_stack(tmp_path):
    server = start_pagedserve(None, device="cpu", log_path=tmp_path / "serve.log",
                              extra=["--max-model-len", "256", "--num-gpu-blocks-override", "96", "--max-num-seqs", "8",
                                     "--shutdown-grace", "2", "--quiet"])
    try:
        url = server.wait_ready(240)
        out = tmp_path / "out" / "bench.json"
        r = bench(url, "--num-prompts", str(NUM_PROMPTS), "--input-len", str(INPUT_LEN), "--output-len",
                  str(OUTPUT_LEN), "--max-concurrency", "2,4", "--goodput", "ttft:5000", "tpot:1000",
                  "--num-warmups", "1", "--seed", "1", "--result-file", str(out), "--device-label", "cpu (CI)")
        assert "Serving Benchmark Result" in r.stdout and "P99 TTFT (ms)" in r.stdout
        assert "requests" in r.stderr or "conc" in r.stderr  # the progress bar
        data = json.loads(out.read_text())
        meta = data["meta"]
        assert meta["device"] == "cpu (CI)" and meta["date"] and "bench serve" in meta["command"]
        assert meta["model"] == "SmolLM2-135M-Instruct" and meta["goodput_slos_ms"] == {"ttft": 5000, "tpot": 1000}
        assert [m["max_concurrency"] for m in data["runs"]] == [2, 4]
        for m in data["runs"]:
            check_run(m, NUM_PROMPTS, OUTPUT_LEN)
            assert m["input_lens"] == [INPUT_LEN] * NUM_PROMPTS  # one SmolLM2 token per common word
        latency, throughput = tmp_path / "out" / "bench_latency.png", tmp_path / "out" / "bench_throughput.png"
        assert latency.stat().st_size > 10_000 and throughput.stat().st_size > 10_000
        assert data["files"] == [str(out), str(latency), str(throughput)]

        # the chat endpoint with the conversation dataset (the server's usage gives the real prompt lengths)
        out2 = tmp_path / "chat.json"
        bench(url, "--endpoint", "/v1/chat/completions", "--dataset-name", "conversation", "--num-prompts", "4",
              "--conversation-input-median", "24", "--conversation-output-median", "6",
              "--conversation-max-output", "8", "--max-concurrency", "4", "--num-warmups", "0",
              "--goodput", "e2el:60000", "--result-file", str(out2), "--no-plot", "--disable-tqdm")
        (m,) = json.loads(out2.read_text())["runs"]
        check_run(m, 4, None)
        assert all(1 <= n <= 8 for n in m["output_lens"])
        assert all(n > 20 for n in m["input_lens"])  # chat template included
        assert not (tmp_path / "chat_latency.png").exists()
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.output()


TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "vocab_size": 49152, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": True}


def test_bench_serve_naive_hf_baseline(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    server = start_hf_server(dummy_config=str(cfg), device="cpu", extra=["--max-model-len", "256", "--threads", "1"],
                             log_path=tmp_path / "hf.log")
    try:
        url = server.wait_ready(240)
        out = tmp_path / "hf.json"
        bench(url, "--num-prompts", "4", "--input-len", "16", "--output-len", "12", "--max-concurrency", "4",
              "--goodput", "ttft:60000", "--result-file", str(out), "--no-plot", "--disable-tqdm", "--save-detailed")
        (m,) = json.loads(out.read_text())["runs"]
        check_run(m, 4, 12)
        # one request at a time: with 4 sent together, each waits for the ones before it, so the
        # k-th first token comes after the (k-1)-th request ended
        ttfts, e2els = sorted(m["ttfts_s"]), sorted(m["e2els_s"])
        for k in range(1, 4):
            assert ttfts[k] >= e2els[k - 1] * 0.95
        assert all(len(x) >= 1 for x in m["itls_s"])  # streamed token by token

        chat = tmp_path / "hf_chat.json"
        bench(url, "--endpoint", "/v1/chat/completions", "--num-prompts", "2", "--input-len", "8", "--output-len",
              "5", "--num-warmups", "0", "--goodput", "ttft:60000", "--result-file", str(chat), "--no-plot",
              "--disable-tqdm")
        check_run(json.loads(chat.read_text())["runs"][0], 2, 5)
    finally:
        server.stop()
