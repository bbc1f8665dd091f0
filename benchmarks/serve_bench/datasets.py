"""The benchmark's prompts, generated locally (no downloads, reproducible with a seed): the random
dataset (uniform lengths) and the ShareGPT-like conversation mix (lognormal lengths, prior turns)."""
from __future__ import annotations

import argparse
import math
import os
import random
from dataclasses import dataclass
from typing import Any

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
                        template_margin: int = 64, shared_prefixes: int = 0,
                        prefix_len: int = 256) -> list[BenchRequest]:
    """Conversation-like requests: the input is split over 1-4 prior turns (user/assistant) plus the
    new user message; lengths from `conversation_lengths` (template_margin tokens are kept free for
    the chat template). With shared_prefixes K > 0 every conversation starts with one of K system
    prompts of about prefix_len tokens (picked at random): the shared-prefix workload that
    prefix-aware routing and the prefix cache are for (issue 18)."""
    margin = template_margin + (prefix_len if shared_prefixes else 0)
    cap = None if max_model_len is None else max(16, max_model_len - margin)
    lengths = conversation_lengths(n, seed, input_median, output_median, sigma, max_input, max_output, cap)
    rng = random.Random(seed + 1)
    src = TextSource(rng, tokenizer)
    systems = [(f"You are assistant {k}. " + src.text(prefix_len)[0], prefix_len) for k in range(shared_prefixes)]
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
        if systems:
            system, system_len = rng.choice(systems)
            messages.insert(0, {"role": "system", "content": system})
            total += system_len
        if chat:
            prompt: str | list[dict] = messages
        else:
            names = {"user": "User", "assistant": "Assistant", "system": "System"}
            prompt = "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages)
            prompt += "Assistant:"
        reqs.append(BenchRequest(prompt, total, out_len))
    return reqs


def load_bench_tokenizer(spec: str | None):
    if not spec or spec.lower() == "none":
        return None
    from engine_core.tokenizer import load_tokenizer

    if spec.lower() in ("embedded", "default", "smollm2"):
        from engine_core.loader.model_source import embedded_gguf_path

        spec = embedded_gguf_path()
    return load_tokenizer(os.path.expanduser(spec))


def make_requests(args: argparse.Namespace, chat: bool, max_model_len: int | None) -> list[BenchRequest]:
    tok = load_bench_tokenizer(args.tokenizer)
    if args.dataset_name == "random":
        return sample_random(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed, chat, tok)
    return sample_conversation(args.num_prompts, args.seed, chat, tok, input_median=args.conversation_input_median,
                               output_median=args.conversation_output_median, sigma=args.conversation_sigma,
                               max_input=args.conversation_max_input, max_output=args.conversation_max_output,
                               max_model_len=max_model_len, shared_prefixes=args.conversation_shared_prefixes,
                               prefix_len=args.conversation_prefix_len)
