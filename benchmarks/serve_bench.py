"""`pagedserve bench serve`: an online serving benchmark for any OpenAI-compatible endpoint (modelled
on `vllm bench serve`).

    pagedserve bench serve --base-url http://127.0.0.1:8000 --endpoint /v1/completions \\
        --dataset-name random --input-len 128 --output-len 128 --num-prompts 200 \\
        --max-concurrency 1,4,16,64 --goodput ttft:200 tpot:50 --result-file out/bench.json

Every request streams (SSE) with `stream_options.include_usage`, `ignore_eos: true` and
`max_tokens = output length`, so output lengths are exact. Output tokens are counted from the
usage in the final chunk (the chunk count when a server sends none). Per request:

- TTFT: request sent -> first chunk carrying text;
- ITL: gaps between successive text chunks (pooled over all requests);
- TPOT: (E2E - TTFT) / (output tokens - 1), requests with more than one output token;
- E2E: request sent -> end of the stream.

Load: `--request-rate R` (Poisson arrivals, gamma with `--burstiness`; inf: all at once) and/or
`--max-concurrency N` (at most N requests in flight; closed loop). Either may be a comma list, e.g.
`--max-concurrency 1,4,16`: one run per value (a sweep) with the same prompts. Goodput counts the
requests per second that meet every SLO given with `--goodput ttft:MS tpot:MS e2el:MS`.

Datasets (generated locally, no downloads, reproducible with --seed):
- random: input/output lengths uniform in [L*(1-r), L*(1+r)] (--range-ratio r); the text is token
  ids of --tokenizer decoded to text, or random common English words (about one token each) when
  no tokenizer is given;
- conversation: a ShareGPT-like mix: lognormal input and output lengths (medians and sigma
  configurable), a few prior turns per conversation (chat: messages; completions: a transcript).
Prompt lengths in the results are the server's usage.prompt_tokens when it reports them.

Output: a summary table on stdout; with --result-file (or --save-result) a JSON file holding the
metadata (date, command, endpoint, device label) and one entry per run, plus PNG plots next to it:
`<name>_latency.png` (TTFT/TPOT/ITL/E2E mean and percentiles) and, for a sweep,
`<name>_throughput.png` (throughput and latency vs concurrency or request rate).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
SLO_ALIASES = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "e2e": "e2el", "itl": "itl"}

# Common English words, each a single token in SmolLM2's vocabulary (with or without a leading space),
# and in most BPE vocabularies: a prompt of N words is about N tokens.
WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "by", "this", "had",
    "not", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all", "she", "there",
    "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said",
    "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time",
    "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me",
    "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where",
    "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too",
    "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get",
    "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while",
    "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right",
    "used", "take", "three", "small", "house", "water", "city", "light", "night", "hand", "part", "place", "case",
    "week", "company", "system", "program", "question", "number", "point", "home", "group", "school", "story",
    "fact", "money", "month", "lot", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind",
    "head", "service", "friend", "power", "hour", "game", "line", "end", "member", "law", "car", "name",
    "president", "team", "minute", "idea", "body", "information", "parent", "face", "others", "level", "office",
    "door", "health", "person", "art", "war", "history", "party", "result", "change", "reason", "research", "girl",
    "moment", "air", "teacher", "force", "education",
)


# ---------------------------------------------------------------------------- requests and datasets
@dataclass
class BenchRequest:
    prompt: str | list[dict]  # text (/v1/completions) or chat messages (/v1/chat/completions)
    prompt_len: int  # the client's estimate; the server's usage.prompt_tokens wins when reported
    output_len: int


def _lengths(rng: random.Random, n: int, mean: int, ratio: float, lo: int = 1) -> list[int]:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {ratio}")
    a, b = max(lo, int(mean * (1 - ratio))), max(lo, math.ceil(mean * (1 + ratio)))
    return [rng.randint(a, b) if b > a else a for _ in range(n)]


class TextSource:
    """Makes text of about `n` tokens: random token ids decoded (with a tokenizer) or random words."""

    def __init__(self, rng: random.Random, tokenizer: Any | None = None) -> None:
        self.rng, self.tok = rng, tokenizer
        self.ids: list[int] = []
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", ()) or ())
            # Skip the low ids (bytes and control tokens in most vocabularies) and special tokens.
            self.ids = [i for i in range(min(256, len(tokenizer) - 1), len(tokenizer)) if i not in special]

    def text(self, n: int) -> tuple[str, int]:
        """(text, its length in tokens: exact with a tokenizer, the word count otherwise)."""
        if self.tok is None or not self.ids:
            return " ".join(self.rng.choice(WORDS) for _ in range(n)), n
        ids = [self.rng.choice(self.ids) for _ in range(n)]
        text = self.tok.decode(ids)
        for _ in range(4):  # decode -> encode is not the identity: nudge towards n tokens
            enc = self.tok.encode(text, add_special_tokens=False)
            if len(enc) == n:
                break
            enc = enc[:n] if len(enc) > n else enc + [self.rng.choice(self.ids) for _ in range(n - len(enc))]
            text = self.tok.decode(enc)
        return text, len(self.tok.encode(text, add_special_tokens=False))


def sample_random(n: int, input_len: int, output_len: int, range_ratio: float, seed: int, chat: bool,
                  tokenizer: Any | None = None) -> list[BenchRequest]:
    rng = random.Random(seed)
    ins, outs = _lengths(rng, n, input_len, range_ratio), _lengths(rng, n, output_len, range_ratio)
    src = TextSource(rng, tokenizer)
    reqs = []
    for i, o in zip(ins, outs):
        text, plen = src.text(i)
        reqs.append(BenchRequest([{"role": "user", "content": text}] if chat else text, plen, o))
    return reqs


def conversation_lengths(n: int, seed: int, input_median: float = 100.0, output_median: float = 200.0,
                         sigma: float = 1.0, max_input: int = 1024, max_output: int = 1024,
                         max_model_len: int | None = None, min_len: int = 4) -> list[tuple[int, int]]:
    """ShareGPT-like (input, output) token lengths: lognormal, clipped. With the defaults the means
    are about 165 in / 330 out, close to ShareGPT's 161 / 338 reported in the vLLM paper."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = int(min(max_input, max(min_len, round(rng.lognormvariate(math.log(input_median), sigma)))))
        o = int(min(max_output, max(min_len, round(rng.lognormvariate(math.log(output_median), sigma)))))
        if max_model_len is not None:
            i = min(i, max(min_len, max_model_len // 2))
            o = max(1, min(o, max_model_len - i))
        out.append((i, o))
    return out


def sample_conversation(n: int, seed: int, chat: bool, tokenizer: Any | None = None, *,
                        input_median: float = 100.0, output_median: float = 200.0, sigma: float = 1.0,
                        max_input: int = 1024, max_output: int = 1024, max_model_len: int | None = None,
                        template_margin: int = 64) -> list[BenchRequest]:
    """Conversation-like requests: the input is split over 1-4 prior turns (user/assistant) plus the
    new user message; lengths from `conversation_lengths` (template_margin tokens are kept free for
    the chat template)."""
    cap = None if max_model_len is None else max(16, max_model_len - template_margin)
    lengths = conversation_lengths(n, seed, input_median, output_median, sigma, max_input, max_output, cap)
    rng = random.Random(seed + 1)
    src = TextSource(rng, tokenizer)
    reqs = []
    for in_len, out_len in lengths:
        turns = min(1 + 2 * rng.choice((0, 0, 1, 1, 2, 3)), max(1, in_len // 8) | 1)  # odd: ends with user
        cuts = sorted(rng.sample(range(1, in_len), turns - 1)) if turns > 1 and in_len > turns else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, in_len])] or [in_len]
        messages, total = [], 0
        for k, size in enumerate(sizes):
            text, tl = src.text(max(1, size))
            total += tl
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
        if messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": src.text(1)[0]})
        if chat:
            prompt: str | list[dict] = messages
        else:
            prompt = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages)
            prompt += "Assistant:"
        reqs.append(BenchRequest(prompt, total, out_len))
    return reqs


# ---------------------------------------------------------------------------- one streamed request
@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0  # relative to the start of the run
    error: str = ""
    num_chunks: int = 0  # chunks carrying text
    usage_reported: bool = False
    generated_text: str = ""


class StreamParser:
    """Feeds SSE lines (with their arrival time) into a RequestResult. Pure: unit-testable with
    synthetic timings."""

    def __init__(self, result: RequestResult, start: float, chat: bool) -> None:
        self.r, self.start, self.chat = result, start, chat
        self.last: float | None = None
        self.done = False
        self._text: list[str] = []

    def feed(self, line: str, now: float) -> None:
        line = line.strip()
        if not line or line.startswith(":") or not line.startswith("data:"):
            return  # blank separators, comments, `event:` / `id:` fields
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise RuntimeError(f"bad SSE payload: {payload[:200]!r}") from None
        if isinstance(chunk, dict) and chunk.get("error"):
            err = chunk["error"]
            raise RuntimeError(f"in-band error: {err.get('message', err) if isinstance(err, dict) else err}")
        text = ""
        for choice in chunk.get("choices") or ():
            if self.chat:
                delta = choice.get("delta") or {}
                text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
            else:
                text += choice.get("text") or ""
        if text:
            if self.last is None:
                self.r.ttft = now - self.start
            else:
                self.r.itl.append(now - self.last)
            self.last = now
            self.r.num_chunks += 1
            self._text.append(text)
        usage = chunk.get("usage")
        if usage:
            self.r.usage_reported = True
            if usage.get("completion_tokens") is not None:
                self.r.output_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                self.r.prompt_len = int(usage["prompt_tokens"])

    def finish(self, now: float) -> RequestResult:
        r = self.r
        r.latency = now - self.start
        r.generated_text = "".join(self._text)
        if not r.usage_reported:
            r.output_tokens = r.num_chunks
        if r.num_chunks == 0 and r.output_tokens > 0:
            r.ttft = r.latency  # text-less stream (e.g. ids the tokenizer cannot decode)
        r.success = r.num_chunks > 0 or r.output_tokens > 0
        if not r.success:
            r.error = "the stream carried no output"
        return r


def build_body(req: BenchRequest, model: str | None, chat: bool, args: argparse.Namespace) -> dict:
    body: dict[str, Any] = {"stream": True, "temperature": args.temperature}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = req.prompt
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if args.include_usage:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.extra_body:
        body.update(json.loads(args.extra_body))
    return body


async def send_request(client, url: str, headers: dict, body: dict, req: BenchRequest, chat: bool,
                       t_origin: float) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    result.start_time = start - t_origin
    parser = StreamParser(result, start, chat)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:300]}"
                result.latency = time.perf_counter() - start
                return result
            async for line in resp.aiter_lines():
                parser.feed(line, time.perf_counter())
                if parser.done:
                    break
        parser.finish(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - any failure is one failed request, reported
        result.success = False
        result.error = f"{type(e).__name__}: {e}"[:300]
        result.latency = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- metrics
def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for spec in specs or ():
        for item in spec.replace(",", " ").split():
            name, _, value = item.partition(":")
            key = SLO_ALIASES.get(name.strip().lower())
            if key is None or not value:
                raise ValueError(f"bad --goodput item {item!r}: expected ttft:MS, tpot:MS, itl:MS or e2el:MS")
            slos[key] = float(value)
            if slos[key] <= 0:
                raise ValueError(f"--goodput {name} must be > 0 ms")
    return slos


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / n) if n else 0.0
    out = {"mean": mean, "median": _percentile(ms, 50), "std": std}
    for p in percentiles:
        out[f"p{p:g}"] = _percentile(ms, p)
    return out


def tpot_of(r: RequestResult) -> float | None:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def calculate_metrics(results: list[RequestResult], duration: float, slos: dict[str, float] | None = None,
                      percentiles: list[float] = (50, 90, 99)) -> dict[str, Any]:
    """vLLM's flat result shape: completed, failed, total_*_tokens, *_throughput, request_goodput,
    {mean,median,std,pNN}_{ttft,tpot,itl,e2el}_ms, plus per-request lists."""
    ok = [r for r in results if r.success]
    tpots = [t for t in (tpot_of(r) for r in ok) if t is not None]
    per_metric = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
                  "e2el": [r.latency for r in ok]}
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "request_goodput": None,
        "goodput_slos_ms": dict(slos or {}),
        "good_requests": None,
    }
    if slos:
        def good(r: RequestResult) -> bool:
            vals = {"ttft": r.ttft, "tpot": tpot_of(r) or 0.0, "e2el": r.latency, "itl": max(r.itl, default=0.0)}
            return all(vals[k] * 1000.0 <= v for k, v in slos.items())

        n_good = sum(1 for r in ok if good(r))
        m["good_requests"] = n_good
        m["request_goodput"] = n_good / duration if duration > 0 else 0.0
    for name, values in per_metric.items():
        for stat, v in _stats(values, list(percentiles)).items():
            m[f"{stat}_{name}_ms"] = v
    m["max_output_tokens_per_s"] = _peak_output_rate(ok)
    m["usage_reported"] = sum(1 for r in ok if r.usage_reported)
    m["input_lens"] = [r.prompt_len for r in ok]
    m["output_lens"] = [r.output_tokens for r in ok]
    m["ttfts_s"] = [r.ttft for r in ok]
    m["tpots_s"] = [tpot_of(r) for r in ok]
    m["e2els_s"] = [r.latency for r in ok]
    m["errors"] = [r.error for r in results if not r.success][:20]
    return m


def _peak_output_rate(ok: list[RequestResult]) -> float:
    """Highest output tokens/s over any 1 s window (token times reconstructed from the chunks)."""
    times = []
    for r in ok:
        t = r.start_time + r.ttft
        times.append(t)
        for gap in r.itl:
            t += gap
            times.append(t)
    if not times:
        return 0.0
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int(t)] = buckets.get(int(t), 0) + 1
    # chunks, not tokens: scale by tokens per chunk over the whole run
    scale = sum(r.output_tokens for r in ok) / max(1, len(times))
    return max(buckets.values()) * scale


# ---------------------------------------------------------------------------- one run
async def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yields request indices at Poisson (gamma, for burstiness != 1) arrival times."""
    t0 = time.perf_counter()
    target = 0.0
    for i in range(n):
        if i > 0 and rate != float("inf"):
            target += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
            delay = t0 + target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield i


async def run_once(reqs: list[BenchRequest], *, url: str, headers: dict, model: str | None, chat: bool,
                   args: argparse.Namespace, request_rate: float, max_concurrency: int | None,
                   num_warmups: int = 0, slos: dict[str, float] | None = None, desc: str = "") -> dict[str, Any]:
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, http2=False) as client:
        if num_warmups > 0:
            warm = reqs[:num_warmups]
            outs = await asyncio.gather(*(send_request(client, url, headers, build_body(r, model, chat, args), r,
                                                       chat, time.perf_counter()) for r in warm))
            bad = [o.error for o in outs if not o.success]
            if bad:
                raise RuntimeError(f"warm-up request failed: {bad[0]}")

        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(reqs), desc=desc or "requests", disable=args.disable_tqdm, dynamic_ncols=True,
                   file=sys.stderr)
        results: list[RequestResult | None] = [None] * len(reqs)
        t_origin = time.perf_counter()

        async def one(i: int) -> None:
            body = build_body(reqs[i], model, chat, args)
            if sem is None:
                results[i] = await send_request(client, url, headers, body, reqs[i], chat, t_origin)
            else:
                async with sem:
                    results[i] = await send_request(client, url, headers, body, reqs[i], chat, t_origin)
            bar.update(1)

        tasks = []
        rng = random.Random(args.seed + 7)
        async for i in _arrivals(len(reqs), request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_origin
        bar.close()
    m = calculate_metrics([r for r in results if r is not None], duration, slos, args.percentiles)
    m.update({"request_rate": "inf" if request_rate == float("inf") else request_rate,
              "burstiness": args.burstiness, "max_concurrency": max_concurrency, "num_prompts": len(reqs)})
    if args.save_detailed:
        m["itls_s"] = [r.itl for r in results if r is not None and r.success]
        m["generated_texts"] = [r.generated_text for r in results if r is not None and r.success]
    return m


# ---------------------------------------------------------------------------- report
def print_run(m: dict[str, Any], percentiles: list[float]) -> None:
    w = 50
    conc = m.get("max_concurrency")
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    rows = [("Request rate (req/s):", m["request_rate"]), ("Max concurrency:", conc if conc else "unlimited"),
            ("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"), ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}")]
    if m.get("request_goodput") is not None:
        rows.append((f"Request goodput (req/s) {_slo_text(m['goodput_slos_ms'])}:", f"{m['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
             ("Peak output token throughput (tok/s):", f"{m['max_output_tokens_per_s']:.2f}"),
             ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<40}{v!s:>10}")
    for name in METRICS:
        print("{s:{c}^{n}}".format(s=f" {METRIC_TITLES[name]} ", n=w, c="-"))
        print(f"{'Mean ' + name.upper() + ' (ms):':<40}{m[f'mean_{name}_ms']:>10.2f}")
        for p in percentiles:
            print(f"{f'P{p:g} ' + name.upper() + ' (ms):':<40}{m[f'p{p:g}_{name}_ms']:>10.2f}")
    if m["errors"]:
        print(f"first errors: {m['errors'][:3]}")
    print("=" * w, flush=True)


def _slo_text(slos: dict[str, float]) -> str:
    return "[" + ", ".join(f"{k}<={v:g}ms" for k, v in slos.items()) + "]"


def run_label(m: dict[str, Any]) -> str:
    conc = m.get("max_concurrency")
    rate = m.get("request_rate")
    parts = []
    if conc:
        parts.append(f"concurrency {conc}")
    if rate != "inf" or not conc:
        parts.append(f"rate {rate}/s" if rate != "inf" else "all at once")
    return ", ".join(parts)


def plot_latency(runs: list[dict[str, Any]], path: str, title: str, percentiles: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = ["mean"] + [f"p{p:g}" for p in percentiles]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    width = 0.8 / max(1, len(runs))
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes, METRICS):
        for k, m in enumerate(runs):
            xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(stats))]
            ax.bar(xs, [m[f"{s}_{name}_ms"] for s in stats], width, label=run_label(m),
                   color=cmap(k / max(1, len(runs) - 1)) if len(runs) > 1 else "#3b7dd8")
        ax.set_xticks(range(len(stats)), stats)
        ax.set_title(f"{METRIC_TITLES[name]} (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(runs: list[dict[str, Any]], path: str, title: str) -> None:
    """Throughput and latency vs concurrency (or vs request rate when the concurrency is fixed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_conc = len({m.get("max_concurrency") for m in runs}) > 1 and all(m.get("max_concurrency") for m in runs)
    keys = [m["max_concurrency"] if by_conc else (math.inf if m["request_rate"] == "inf" else m["request_rate"])
            for m in runs]
    order = sorted(range(len(runs)), key=lambda i: keys[i])
    r = [runs[i] for i in order]
    labels = [run_label(m) if not by_conc else str(m["max_concurrency"]) for m in r]
    # concurrency: a log2 axis; anything else (rates, inf, mixed): evenly spaced categories
    x = [m["max_concurrency"] for m in r] if by_conc else list(range(len(r)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.plot(x, [m["output_throughput"] for m in r], "o-", label="output tok/s")
    a1.plot(x, [m["total_token_throughput"] for m in r], "s--", label="total (in+out) tok/s", alpha=0.7)
    if any(m.get("request_goodput") is not None for m in r):
        a1b = a1.twinx()
        a1b.plot(x, [m.get("request_goodput") or 0 for m in r], "^:", color="tab:green", label="goodput req/s")
        a1b.set_ylabel("goodput (req/s)")
        a1b.legend(loc="lower right", fontsize=8)
    a1.set_ylabel("tokens / s")
    a1.legend(loc="upper left", fontsize=8)
    a1.set_title("throughput")
    for name, marker, color in (("ttft", "o", "tab:blue"), ("tpot", "s", "tab:orange"), ("e2el", "^", "tab:purple")):
        for stat, line in (("p50", "-"), ("p99", "--")):
            a2.plot(x, [m[f"{stat}_{name}_ms"] for m in r], marker + line, color=color, alpha=1.0 if stat == "p50"
                    else 0.6, label=f"{name.upper()} {stat}")
    a2.set_yscale("log")
    a2.set_ylabel("ms (log)")
    a2.set_title("latency")
    a2.legend(fontsize=7, ncol=2)
    for ax in (a1, a2):
        ax.set_xlabel("max concurrency" if by_conc else "load")
        if by_conc:
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, labels, fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- driver
def _parse_list(value: str | None, kind) -> list:
    if value is None:
        return [None]
    out = []
    for item in str(value).split(","):
        item = item.strip().lower()
        if item in ("", "none", "unlimited", "0") and kind is int:
            out.append(None)
        elif item == "inf" and kind is float:
            out.append(float("inf"))
        else:
            v = kind(item)
            if v <= 0:
                raise ValueError(f"expected a positive value, got {item!r}")
            out.append(v)
    return out


def load_bench_tokenizer(spec: str | None):
    if not spec or spec.lower() == "none":
        return None
    from engine_core.tokenizer import load_tokenizer

    if spec.lower() in ("embedded", "default", "smollm2"):
        from engine_core.loader.model_source import embedded_gguf_path

        spec = embedded_gguf_path()
    return load_tokenizer(os.path.expanduser(spec))


def server_info(base_url: str, headers: dict) -> dict:
    """The first model of GET /v1/models ({} when the server has no such route)."""
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        if r.status_code == 200 and r.json().get("data"):
            return r.json()["data"][0]
    except (httpx.HTTPError, ValueError):
        pass
    return {}


def make_requests(args: argparse.Namespace, chat: bool, max_model_len: int | None) -> list[BenchRequest]:
    tok = load_bench_tokenizer(args.tokenizer)
    if args.dataset_name == "random":
        return sample_random(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed, chat, tok)
    return sample_conversation(args.num_prompts, args.seed, chat, tok, input_median=args.conversation_input_median,
                               output_median=args.conversation_output_median, sigma=args.conversation_sigma,
                               max_input=args.conversation_max_input, max_output=args.conversation_max_output,
                               max_model_len=max_model_len)


def default_result_base(model: str | None) -> str:
    name = (model or "model").replace("/", "_")
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    return os.path.join(RESULTS_DIR, f"bench_serve_{name}_{stamp}")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every (concurrency, rate) combination; returns {"meta", "runs", "files"}; writes the
    JSON and plots when asked."""
    if args.endpoint not in ("/v1/completions", "/v1/chat/completions"):
        raise ValueError(f"--endpoint must be /v1/completions or /v1/chat/completions, got {args.endpoint!r}")
    chat = args.endpoint.endswith("chat/completions")
    if not isinstance(args.percentiles, list):
        args.percentiles = [float(p) for p in str(args.percentiles).split(",") if p.strip()]
    slos = parse_goodput(args.goodput)
    concurrencies = _parse_list(args.max_concurrency, int)
    rates = _parse_list(args.request_rate, float)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    base = base.removesuffix("/v1")
    info = server_info(base, headers)
    model = args.model or info.get("id")
    max_model_len = args.max_model_len or info.get("max_model_len")
    reqs = make_requests(args, chat, max_model_len)
    url = base + args.endpoint

    runs = []
    for conc in concurrencies:
        for rate in rates:
            desc = f"conc {conc or 'inf'}, rate {rate:g}" if rate != float("inf") else f"conc {conc or 'inf'}"
            m = asyncio.run(run_once(reqs, url=url, headers=headers, model=model, chat=chat, args=args,
                                     request_rate=rate, max_concurrency=conc, num_warmups=args.num_warmups,
                                     slos=slos, desc=desc))
            print_run(m, args.percentiles)
            runs.append(m)

    date = dt.date.today().isoformat()
    meta = {
        "date": date, "time": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]) or "pagedserve", *sys.argv[1:]]),
        "base_url": base, "endpoint": args.endpoint, "model": model, "server_max_model_len": max_model_len,
        "device": args.device_label or "unknown (remote endpoint; pass --device-label)",
        "client_host": f"{socket.gethostname()} ({platform.machine()}, {os.cpu_count()} cpus)",
        "dataset": args.dataset_name, "num_prompts": args.num_prompts, "seed": args.seed,
        "input_len": args.input_len if args.dataset_name == "random" else None,
        "output_len": args.output_len if args.dataset_name == "random" else None,
        "range_ratio": args.range_ratio if args.dataset_name == "random" else None,
        "tokenizer": args.tokenizer, "num_warmups": args.num_warmups, "ignore_eos": args.ignore_eos,
        "temperature": args.temperature, "percentiles": args.percentiles, "goodput_slos_ms": slos,
        "max_concurrency": concurrencies, "request_rate": ["inf" if r == float("inf") else r for r in rates],
    }
    for item in args.metadata or ():
        k, _, v = item.partition("=")
        meta[k] = v
    out = {"meta": meta, "runs": runs, "files": []}

    path = args.result_file
    if path is None and args.save_result:
        path = default_result_base(model) + ".json"
    if path:
        stem = path.removesuffix(".json")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        out["files"].append(path)
        if not args.no_plot:
            title = (f"{model} · {args.endpoint} · {args.dataset_name} dataset, {args.num_prompts} prompts · "
                     f"{meta['device']} · {date}")
            try:
                plot_latency(runs, stem + "_latency.png", title, args.percentiles)
                out["files"].append(stem + "_latency.png")
                if len(runs) > 1:
                    plot_sweep(runs, stem + "_throughput.png", title)
                    out["files"].append(stem + "_throughput.png")
            except ImportError as e:  # e.g. a GPU image without matplotlib: keep the numbers
                print(f"warning: no plots ({e})", file=sys.stderr)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {', '.join(out['files'])}", flush=True)
    return out


# ---------------------------------------------------------------------------- CLI
def add_serve_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default http://127.0.0.1:8000)")
    g.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", "--dataset", default="random", choices=["random", "conversation"])
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128)
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=128)
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (default 0: exact)")
    g.add_argument("--tokenizer", default=None,
                   help="make prompts from random token ids of this tokenizer (GGUF file, HF directory or "
                        "'embedded' for SmolLM2); default: random common words")
    g.add_argument("--conversation-input-median", type=float, default=100.0)
    g.add_argument("--conversation-output-median", type=float, default=200.0)
    g.add_argument("--conversation-sigma", type=float, default=1.0, help="lognormal sigma (default 1.0)")
    g.add_argument("--conversation-max-input", type=int, default=1024)
    g.add_argument("--conversation-max-output", type=int, default=1024)
    g.add_argument("--max-model-len", type=int, default=None,
                   help="cap conversation lengths (default: max_model_len from GET /v1/models)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf",
                   help="requests/s, Poisson arrivals; inf: all at once; a comma list runs a sweep (default inf)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1: Poisson)")
    g.add_argument("--max-concurrency", default=None,
                   help="most requests in flight; a comma list (1,4,16) runs a sweep (default unlimited)")
    g.add_argument("--num-warmups", type=int, default=1, help="untimed requests before each run (default 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request makes exactly its output length (default on)")
    g.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="request stream_options.include_usage (default on; off: count chunks)")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g = p.add_argument_group("results")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:200 tpot:50 (keys ttft, tpot, itl, e2el)")
    g.add_argument("--percentiles", default="50,90,99", help="latency percentiles (default 50,90,99)")
    g.add_argument("--result-file", default=None, help="JSON path; plots go next to it (<name>_latency.png, ...)")
    g.add_argument("--save-result", action="store_true",
                   help="write JSON + plots under benchmarks/results/ when --result-file is not given")
    g.add_argument("--save-detailed", action="store_true", help="also store per-request ITLs and generated text")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--device-label", default=None, help="the server's device, recorded in the metadata")
    g.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE", help="extra metadata")
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def bench_args(**overrides) -> argparse.Namespace:
    """The CLI's defaults with `overrides` (python names: max_concurrency="1,4", num_prompts=8, ...),
    for calling run_benchmark from code."""
    ns = add_serve_bench_args(argparse.ArgumentParser()).parse_args([])
    for k, v in overrides.items():
        if not hasattr(ns, k):
            raise TypeError(f"unknown bench option {k!r}")
        setattr(ns, k, v)
    return ns


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        out = run_benchmark(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(m["completed"] > 0 for m in out["runs"]) else 1


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks (bench serve: online serving benchmark)",
                              description="Benchmarks.")
    sub = p.add_subparsers(dest="bench_command", required=True)
    s = sub.add_parser("serve", help="load-test an OpenAI-compatible endpoint (TTFT/TPOT/ITL/E2E, goodput)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_bench_args(s)
    s.set_defaults(func=_cmd_bench_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_bench_args(p)
    return _cmd_bench_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
