"""Per-step batched sampling state: one row per request that samples this step.

Built once per step by the model runner from host-side lists (``SamplingMetadata.build``). All
per-row data travels to the device in exactly two host->device copies (one float32 buffer, one
int64 buffer, pinned + non_blocking on CUDA), so building it never waits for queued GPU work. The
sampler (engine_core/layers/sampler.py) then runs without any device->host sync.

Host-side fields (``all_greedy``, ``all_random``, ``max_top_k``, ``max_num_logprobs``) decide which
kernels run at all; they are plain Python values computed from the SamplingParams.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from engine_core.sampling_params import GREEDY_EPS, SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generator_seed(seed: int, num_output_tokens: int) -> int:
    """A well-mixed 63-bit seed from (request seed, tokens generated so far)."""
    return _splitmix64((seed & _MASK64) ^ _splitmix64(num_output_tokens & _MASK64)) >> 1


def make_generator(
    seed: int,
    num_output_tokens: int,
    device: torch.device | str,
    out: torch.Generator | None = None,
) -> torch.Generator:
    """Generator for the token a seeded request samples after ``num_output_tokens`` outputs.

    The state depends only on (seed, num_output_tokens), so a request that is preempted and
    recomputed, or replayed on a restarted executor, samples exactly the same tokens. Pass ``out``
    (a generator on ``device`` kept per request) to reseed it instead of allocating a new one.
    Cheap: a few integer ops + manual_seed (no kernel launch, no sync).
    """
    g = out if out is not None else torch.Generator(device=device)
    g.manual_seed(generator_seed(seed, num_output_tokens))
    return g


def _flat_index(rows: list[int], seqs: list[Sequence[int]], V: int) -> np.ndarray:
    """int64 ``row * (V+1) + tok`` for every token of every sequence (ids outside [0, V) -> V).

    Sequences may be lists, numpy arrays or CPU tensors; the work is vectorized in numpy (no
    per-token Python). numpy arrays are cheapest (a concatenate, no int conversion).
    """
    if not rows:
        return np.empty(0, dtype=np.int64)
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    total = int(lens.sum())
    if all(isinstance(s, list) for s in seqs):
        toks = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=total)
    else:
        toks = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs])
    toks = np.where((toks >= 0) & (toks < V), toks, V)
    return np.repeat(np.asarray(rows, dtype=np.int64) * (V + 1), lens) + toks


def _upload(parts: list[np.ndarray | list], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Concatenate host arrays into one (pinned, on CUDA) buffer and start one H2D copy.

    Pinned + non_blocking: a pageable copy would wait for all queued GPU work (a host sync).
    """
    np_dtype = np.int64 if dtype == torch.int64 else np.float32
    arrs = [np.asarray(p, dtype=np_dtype) for p in parts]
    total = sum(a.size for a in arrs)
    buf = torch.empty(total, dtype=dtype, pin_memory=device.type == "cuda")
    if total:
        np.concatenate(arrs, out=buf.numpy())
    if device.type == "cpu":
        return buf
    return buf.to(device, non_blocking=device.type == "cuda")


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [N] float32; 0.0 for greedy rows
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None = None  # [N] int64, 0 = off; None if no random row uses it
    top_p: torch.Tensor | None = None  # [N] float32, 1.0 = off
    min_p: torch.Tensor | None = None  # [N] float32, 0.0 = off
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    default_generator: torch.Generator | None = None  # unseeded random rows (None: torch's global RNG)
    presence_penalties: torch.Tensor | None = None  # [N] float32
    frequency_penalties: torch.Tensor | None = None  # [N] float32
    repetition_penalties: torch.Tensor | None = None  # [N] float32
    output_token_counts: torch.Tensor | None = None  # [N, V] int32 view (non-contiguous); 0 for rows w/o penalties
    prompt_token_mask: torch.Tensor | None = None  # [N, V] bool; None if no row has repetition_penalty != 1
    logit_bias: torch.Tensor | None = None  # [N, V] float32 dense
    max_num_logprobs: int | None = None  # None: no row wants logprobs
    # (rows, token_ids) int64 pairs to set to -inf this step (eos/stop ids while min_tokens unmet)
    min_tokens_ban: tuple[torch.Tensor, torch.Tensor] | None = None
    max_top_k: int = 0  # host copy of max(top_k) (avoids a .item() sync)
    top_k_all_rows: bool = False  # every random row has top_k > 0 (greedy rows' top_k is moot)
    vocab_size: int = 0

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def no_penalties(self) -> bool:
        return self.output_token_counts is None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: list[int],
        default_generator: torch.Generator | None = None,
        num_output_tokens: Sequence[int] | None = None,
    ) -> SamplingMetadata:
        """Batch the per-request state of the N requests that sample this step (row i = request i).

        ``vocab_size`` must equal the width of the logits handed to the Sampler.
        ``generators[i]`` is used only if row i is a random (non-greedy) row; unseeded random rows
        draw from ``default_generator`` (on ``device``; None: torch's global RNG).
        Token sequences may be lists, numpy int arrays or CPU tensors (arrays skip the list->tensor
        conversion); they are only read for rows with penalties (prompt: repetition_penalty != 1)
        and, by length, for min_tokens. ``num_output_tokens[i]`` overrides that length when row i
        has output tokens not in its sequence yet (async scheduling: still on the device).
        """
        device = torch.device(device)
        n = len(params)
        V = vocab_size
        assert len(output_token_ids) == n and len(prompt_token_ids) == n and len(generators) == n

        temps: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        pres: list[float] = []
        freq: list[float] = []
        rep: list[float] = []
        gens: dict[int, torch.Generator] = {}
        any_greedy = any_random = False
        max_lp: int | None = None
        out_rows: list[int] = []  # penalty rows and their output / prompt token sequences
        out_seqs: list[Sequence[int]] = []
        prompt_rows: list[int] = []
        prompt_seqs: list[Sequence[int]] = []
        bias_idx: list[int] = []
        bias_val: list[float] = []
        ban_rows: list[int] = []
        ban_toks: list[int] = []
        any_pen = any_rep = False

        for i, p in enumerate(params):
            greedy = p.temperature < GREEDY_EPS
            if greedy:
                any_greedy = True
                temps.append(0.0)
                top_ks.append(0)
                top_ps.append(1.0)
                min_ps.append(0.0)
            else:
                any_random = True
                temps.append(float(p.temperature))
                top_ks.append(p.top_k if 0 < p.top_k < V else 0)
                top_ps.append(float(p.top_p))
                min_ps.append(float(p.min_p))
                g = generators[i]
                if g is not None:
                    gens[i] = g
            if p.logprobs is not None:
                max_lp = p.logprobs if max_lp is None else max(max_lp, p.logprobs)
            if p.needs_penalties:
                any_pen = True
                pres.append(float(p.presence_penalty))
                freq.append(float(p.frequency_penalty))
                rep.append(float(p.repetition_penalty))
                out_rows.append(i)
                out_seqs.append(output_token_ids[i])
                if p.repetition_penalty != 1.0:
                    any_rep = True
                    prompt_rows.append(i)
                    prompt_seqs.append(prompt_token_ids[i])
            else:
                pres.append(0.0)
                freq.append(0.0)
                rep.append(1.0)
            if p.logit_bias:
                base = i * V
                for t, b in p.logit_bias.items():
                    if 0 <= t < V:
                        bias_idx.append(base + t)
                        bias_val.append(b)
            n_out = len(output_token_ids[i]) if num_output_tokens is None else num_output_tokens[i]
            if n_out < p.min_tokens:
                stops = set(p.stop_token_ids)
                if not p.ignore_eos:
                    stops.update(eos_token_ids)
                for t in sorted(stops):
                    if 0 <= t < V:
                        ban_rows.append(i)
                        ban_toks.append(t)

        use_top_k = any(k > 0 for k in top_ks)
        use_top_p = any(x < 1.0 for x in top_ps)
        use_min_p = any(x > 0.0 for x in min_ps)

        # --- one float32 buffer and one int64 buffer -> two H2D copies ---
        # Penalty history as flat indices into [N, V+1]; out-of-vocab ids land in the spare column V.
        count_flat = _flat_index(out_rows, out_seqs, V)
        prompt_flat = _flat_index(prompt_rows, prompt_seqs, V)
        small = (top_ks if use_top_k else []) + bias_idx + ban_rows + ban_toks
        fl = temps + top_ps + min_ps + (pres + freq + rep if any_pen else []) + bias_val
        f_dev = _upload([fl], torch.float32, device)
        i_dev = _upload([small, count_flat, prompt_flat], torch.int64, device)

        fo = 0

        def ftake(k: int) -> torch.Tensor:
            nonlocal fo
            fo += k
            return f_dev[fo - k : fo]

        io = 0

        def itake(k: int) -> torch.Tensor:
            nonlocal io
            io += k
            return i_dev[io - k : io]

        temperature = ftake(n)
        top_p_t = ftake(n)
        min_p_t = ftake(n)
        pres_t = freq_t = rep_t = None
        if any_pen:
            pres_t, freq_t, rep_t = ftake(n), ftake(n), ftake(n)
        bias_v = ftake(len(bias_val))
        top_k_t = itake(n) if use_top_k else None
        bias_i = itake(len(bias_idx))
        ban_r = itake(len(ban_rows))
        ban_t = itake(len(ban_toks))
        count_i = itake(count_flat.size)
        prompt_i = itake(prompt_flat.size)

        counts = prompt_mask = bias = None
        if any_pen:
            counts = torch.zeros(n, V + 1, dtype=torch.int32, device=device)
            if count_i.numel():
                counts.view(-1).scatter_add_(
                    0, count_i, torch.ones(count_i.numel(), dtype=torch.int32, device=device)
                )
            counts = counts[:, :V]
            if any_rep:
                prompt_mask = torch.zeros(n, V + 1, dtype=torch.bool, device=device)
                if prompt_i.numel():
                    prompt_mask.view(-1).index_fill_(0, prompt_i, True)
                prompt_mask = prompt_mask[:, :V]
        if bias_idx:
            bias = torch.zeros(n, V, dtype=torch.float32, device=device)
            bias.view(-1).index_copy_(0, bias_i, bias_v)

        return cls(
            temperature=temperature,
            all_greedy=not any_random,
            all_random=any_random and not any_greedy,
            top_k=top_k_t,
            top_p=top_p_t if use_top_p else None,
            min_p=min_p_t if use_min_p else None,
            generators=gens,
            default_generator=default_generator,
            presence_penalties=pres_t,
            frequency_penalties=freq_t,
            repetition_penalties=rep_t,
            output_token_counts=counts,
            prompt_token_mask=prompt_mask,
            logit_bias=bias,
            max_num_logprobs=max_lp,
            min_tokens_ban=(ban_r, ban_t) if ban_rows else None,
            max_top_k=max(top_ks) if use_top_k else 0,
            top_k_all_rows=use_top_k and all(k > 0 for k, t in zip(top_ks, temps) if t > 0),
            vocab_size=V,
        )
