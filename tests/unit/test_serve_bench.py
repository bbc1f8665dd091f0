"""`pagedserve bench serve` without a server: SSE parsing on synthetic timings (TTFT, ITL, token
counts from usage or chunks, in-band errors), the metrics math (percentiles, TPOT, throughput,
goodput), the datasets, and the CLI registration. The end-to-end run is
tests/integration/test_bench_serve.py."""
from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks import serve_bench as sb
from benchmarks.serve_bench import cli, driver, metrics


def _completion(text: str) -> str:
    return "data: " + json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": text,
                                                                             "finish_reason": None}]})


def _chat(content: str | None, role: bool = False) -> str:
    delta = {"role": "assistant", "content": ""} if role else {"content": content}
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]})


def _usage(prompt: int, completion: int) -> str:
    return "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                           "total_tokens": prompt + completion}})


def _feed(lines_at: list[tuple[str, float]], chat: bool = False, start: float = 100.0, end: float | None = None):
    r = sb.RequestResult(prompt_len=7)
    p = sb.StreamParser(r, start, chat)
    t = start
    for line, t in lines_at:
        p.feed(line, t)
        if p.done:
            break
    return p.finish(end if end is not None else t)


def test_sse_completion_stream_timings_and_usage():
    r = _feed([(_completion("Hello"), 100.25), ("", 100.25), (_completion(" world"), 100.30),
               (": keep-alive comment", 100.31), (_completion(""), 100.33),  # empty text: not a token chunk
               (_completion("!"), 100.40), (_usage(12, 5), 100.41), ("data: [DONE]", 100.42),
               (_completion("after done"), 100.50)])
    assert r.success and r.usage_reported
    assert r.ttft == pytest.approx(0.25)
    assert r.itl == pytest.approx([0.05, 0.10])
    assert r.num_chunks == 3
    assert r.output_tokens == 5  # the usage wins over the chunk count (chunks may hold several tokens)
    assert r.prompt_len == 12  # the server's count replaces the client's estimate
    assert r.latency == pytest.approx(0.42)
    assert r.generated_text == "Hello world!"


def test_sse_chat_role_chunk_is_not_the_first_token_and_chunks_count_without_usage():
    r = _feed([(_chat(None, role=True), 100.01), (_chat("Hi"), 100.5), (_chat(" there"), 100.6),
               ("data:[DONE]", 100.7)], chat=True)
    assert r.ttft == pytest.approx(0.5)
    assert r.output_tokens == 2 and not r.usage_reported
    assert r.prompt_len == 7
    assert sb.tpot_of(r) == pytest.approx((0.7 - 0.5) / 1)


def test_sse_in_band_error_and_garbage_raise():
    p = sb.StreamParser(sb.RequestResult(), 0.0, chat=False)
    with pytest.raises(RuntimeError, match="in-band error: boom"):
        p.feed('data: {"error": {"message": "boom", "type": "server_error"}}', 1.0)
    with pytest.raises(RuntimeError, match="bad SSE payload"):
        sb.StreamParser(sb.RequestResult(), 0.0, chat=False).feed("data: {not json", 1.0)
    empty = _feed([("data: [DONE]", 100.1)])
    assert not empty.success and "no output" in empty.error


def _result(ttft: float, itl: list[float], tokens: int, start: float = 0.0) -> sb.RequestResult:
    return sb.RequestResult(success=True, prompt_len=10, output_tokens=tokens, ttft=ttft, itl=itl,
                            latency=ttft + sum(itl), start_time=start, usage_reported=True)


def test_metrics_math():
    rs = [_result(0.1, [0.02] * 9, 10), _result(0.3, [0.05] * 9, 10, 0.5), _result(1.0, [0.04] * 4, 5, 1.0),
          sb.RequestResult(success=False, error="HTTP 500: x")]
    m = sb.calculate_metrics(rs, duration=2.0, slos={"ttft": 500, "tpot": 45})
    assert m["completed"] == 3 and m["failed"] == 1 and m["errors"] == ["HTTP 500: x"]
    assert m["total_output_tokens"] == 25 == sum(m["output_lens"])
    assert m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(12.5)
    assert m["total_token_throughput"] == pytest.approx(27.5)
    # TPOT = (e2e - ttft) / (tokens - 1): 20 ms, 50 ms, 40 ms
    assert m["mean_tpot_ms"] == pytest.approx((20 + 50 + 40) / 3)
    assert m["p50_tpot_ms"] == pytest.approx(40)
    assert m["p99_tpot_ms"] == pytest.approx(40 + 0.98 * 10)  # linear interpolation, as numpy
    assert m["mean_ttft_ms"] == pytest.approx(1400 / 3)
    assert m["p90_ttft_ms"] == pytest.approx(300 + 0.8 * 700)
    assert m["mean_itl_ms"] == pytest.approx((9 * 20 + 9 * 50 + 4 * 40) / 22)
    assert m["p50_e2el_ms"] == pytest.approx(750)  # e2e: 280, 750, 1160 ms
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(((100 - 1400 / 3) ** 2 + (300 - 1400 / 3) ** 2
                                                         + (1000 - 1400 / 3) ** 2) / 3))
    # goodput: ttft <= 500 ms and tpot <= 45 ms -> only the first request
    assert m["good_requests"] == 1 and m["request_goodput"] == pytest.approx(0.5)
    for name in sb.METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{name}_ms" in m
    assert sb.calculate_metrics(rs, 2.0)["request_goodput"] is None


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 5, 101):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert metrics._percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_parse_goodput_and_lists():
    assert sb.parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    assert sb.parse_goodput(["e2e:1000,itl:30"]) == {"e2el": 1000.0, "itl": 30.0}
    for bad in (["ttft"], ["foo:3"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            sb.parse_goodput(bad)
    assert driver._parse_list("1,4,16", int) == [1, 4, 16]
    assert driver._parse_list(None, int) == [None]
    assert driver._parse_list("inf,2.5", float) == [math.inf, 2.5]


def test_random_dataset_lengths_and_determinism():
    a = sb.sample_random(50, 64, 32, 0.5, seed=3, chat=False)
    b = sb.sample_random(50, 64, 32, 0.5, seed=3, chat=False)
    assert [(r.prompt, r.output_len) for r in a] == [(r.prompt, r.output_len) for r in b]
    assert all(32 <= r.prompt_len <= 96 and 16 <= r.output_len <= 48 for r in a)
    assert all(len(r.prompt.split()) == r.prompt_len for r in a)
    assert len({r.output_len for r in a}) > 5
    exact = sb.sample_random(4, 10, 5, 0.0, seed=0, chat=True)
    assert all(r.output_len == 5 and r.prompt[0]["role"] == "user" for r in exact)


def test_random_dataset_from_token_ids():
    class FakeTok:  # ids -> "w<id>" words: decode/encode round-trips exactly
        all_special_ids = (0,)

        def __len__(self):
            return 400

        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

        def encode(self, text, add_special_tokens=False):
            return [int(w[1:]) for w in text.split()]

    reqs = sb.sample_random(5, 20, 4, 0.0, seed=0, chat=False, tokenizer=FakeTok())
    assert all(r.prompt_len == 20 and len(r.prompt.split()) == 20 for r in reqs)
    assert all(256 <= int(w[1:]) < 400 for r in reqs for w in r.prompt.split())


def test_conversation_dataset():
    lens = sb.conversation_lengths(2000, seed=0)
    ins, outs = [i for i, _ in lens], [o for _, o in lens]
    assert 120 < sum(ins) / len(ins) < 210 and 250 < sum(outs) / len(outs) < 400  # ShareGPT-like means
    assert min(ins) >= 4 and max(ins) <= 1024 and max(outs) <= 1024
    capped = sb.conversation_lengths(500, seed=0, max_model_len=256)
    assert all(i + o <= 256 for i, o in capped)
    chat = sb.sample_conversation(30, seed=1, chat=True, max_model_len=512, input_median=40, output_median=20)
    assert all(r.prompt[-1]["role"] == "user" for r in chat)
    assert any(len(r.prompt) > 1 for r in chat)  # some have prior turns
    assert all(r.prompt_len + r.output_len <= 512 for r in chat)
    text = sb.sample_conversation(5, seed=1, chat=False, input_median=40, output_median=20)
    assert all(r.prompt.startswith("User: ") and r.prompt.endswith("Assistant:") for r in text)


def test_conversation_dataset_with_shared_prefixes():
    chat = sb.sample_conversation(40, seed=2, chat=True, max_model_len=512, input_median=40, output_median=20,
                                  shared_prefixes=4, prefix_len=64)
    systems = [r.prompt[0]["content"] for r in chat]
    assert all(r.prompt[0]["role"] == "system" and r.prompt[-1]["role"] == "user" for r in chat)
    assert len(set(systems)) == 4 and all(len(s.split()) >= 64 for s in systems)
    assert all(r.prompt_len >= 64 + 4 and r.prompt_len + r.output_len <= 512 for r in chat)
    text = sb.sample_conversation(8, seed=2, chat=False, input_median=40, output_median=20, shared_prefixes=2,
                                  prefix_len=32)
    assert all(r.prompt.startswith("System: You are assistant ") for r in text)
    assert len({r.prompt.split("\n")[0] for r in text}) == 2
    assert sb.bench_args(conversation_shared_prefixes=4).conversation_prefix_len == 256


def test_request_body():
    args = sb.bench_args()
    req = sb.BenchRequest("hi", 1, 9)
    body = sb.build_body(req, "m", False, args)
    assert body == {"stream": True, "temperature": 0.0, "model": "m", "prompt": "hi", "max_tokens": 9,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = sb.build_body(sb.BenchRequest([{"role": "user", "content": "hi"}], 1, 3), None, True,
                         sb.bench_args(include_usage=False, extra_body='{"top_k": 5}'))
    assert chat["max_completion_tokens"] == 3 and "model" not in chat and "stream_options" not in chat
    assert chat["top_k"] == 5
    with pytest.raises(TypeError):
        sb.bench_args(no_such_option=1)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for conc in (1, 4):
        m = sb.calculate_metrics([_result(0.1 * conc, [0.02] * 9, 10), _result(0.2, [0.03] * 9, 10)], 1.0)
        m.update(max_concurrency=conc, request_rate="inf")
        runs.append(m)
    sb.plot_latency(runs, str(tmp_path / "lat.png"), "t", [50, 90, 99])
    sb.plot_sweep(runs, str(tmp_path / "tp.png"), "t")
    assert (tmp_path / "lat.png").stat().st_size > 5000 and (tmp_path / "tp.png").stat().st_size > 5000


def test_cli_registers_bench_serve():
    from services.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--max-concurrency", "1,4", "--goodput", "ttft:200",
                                      "tpot:50", "--num-prompts", "3"])
    assert args.func is cli._cmd_bench_serve
    assert args.max_concurrency == "1,4" and args.goodput == ["ttft:200", "tpot:50"] and args.num_prompts == 3
