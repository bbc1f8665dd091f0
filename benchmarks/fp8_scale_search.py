"""Does a smarter per-channel fp8 weight scale lower SmolLM2's perplexity? (docs/fp8.md, Quality)

Every linear layer but the LM head gets its weight rounded through e4m3 with one scale per output
channel, chosen five ways; perplexity on tests/data/perplexity_text.txt through the fp32 model
(the weight-only decode path's numerics, as tests/unit/test_quantization.py measures them).

    .venv/bin/python benchmarks/fp8_scale_search.py

CPU only, ~2 minutes on 2 cores. The calibrated variants collect each input channel's mean x^2:
once from a text the model generates itself (usable at load time) and once from the test text
(an upper bound that would be cheating in practice).
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from engine_core.layers.linear import Linear
from engine_core.loader import load_model, resolve_model
from engine_core.perplexity import perplexity
from engine_core.tokenizer import load_tokenizer

E4M3 = torch.float8_e4m3fn
TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                    "perplexity_text.txt")


def rounded(w: torch.Tensor, mult: torch.Tensor | float = 1.0) -> torch.Tensor:
    """w through e4m3 with scale mult * amax / 448 per output channel (values beyond 448 clip)."""
    s = (w.abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12) * mult
    return (w / s).clamp(-448, 448).to(E4M3).float() * s


def searched(w: torch.Tensor, grid: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per channel, the multiplier in `grid` with the least (input-channel weighted) squared error."""
    best, best_err = None, None
    for m in grid:
        d = rounded(w, float(m))
        e = (d - w).pow(2)
        err = (e if weight is None else e * weight[None, :]).sum(1, keepdim=True)
        if best is None:
            best, best_err = d, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, d, best), torch.where(better, err, best_err)
    return best


def input_second_moments(model: torch.nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and not name.endswith("lm_head"):
            def hook(_mod, inp, name=name):
                x = inp[0].float().reshape(-1, inp[0].shape[-1])
                stats[name] = stats.get(name, 0) + x.pow(2).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    perplexity(model, ids)
    for h in hooks:
        h.remove()
    return stats


def main() -> None:
    torch.manual_seed(0)
    source = resolve_model(None)
    tok = load_tokenizer(source.path)
    with open(TEXT) as f:
        ids = tok.encode(f.read())
    model = load_model(source, "float32", "cpu")
    base = perplexity(model, ids)
    print(f"fp32: {base:.4f}")

    # a calibration text the model writes itself (greedy from a generic instruction)
    from engine_core.llm import LLM
    from engine_core.sampling_params import SamplingParams
    llm = LLM(dtype="float32", enable_prefix_caching=False)
    prompt = "Write a long essay about the history of science, technology and everyday life."
    out = llm.generate([prompt], SamplingParams(temperature=0.8, top_p=0.95, max_tokens=900, seed=0), use_tqdm=False)
    calib = tok.encode(prompt) + list(out[0].outputs[0].token_ids)
    del llm
    self_stats, test_stats = input_second_moments(model, calib), input_second_moments(model, ids)

    up = torch.linspace(1.0, 2.0, 33)[:-1]
    variants = {
        "amax / 448 (ships)": lambda n, w: rounded(w),
        "least squared error on 0.6-1.0x (clips)": lambda n, w: searched(w, torch.linspace(0.6, 1.0, 41)),
        "least squared error on 1-2x": lambda n, w: searched(w, up),
        f"1-2x, x^2-weighted, self-generated calibration ({len(calib)} tokens)":
            lambda n, w: searched(w, up, self_stats[n]),
        "1-2x, x^2-weighted, calibrated on the test text (upper bound)": lambda n, w: searched(w, up, test_stats[n]),
        "2^-0.5 x amax / 448 (clips the top half-binade)": lambda n, w: rounded(w, 2 ** -0.5),
    }
    for label, fn in variants.items():
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, mod in m.named_modules():
                if isinstance(mod, Linear) and not name.endswith("lm_head"):
                    mod.weight.copy_(fn(name, mod.weight.float()))
        p = perplexity(m, ids)
        print(f"{label:70s} {p:8.4f} {100 * (p / base - 1):+6.2f} %", flush=True)


if __name__ == "__main__":
    main()
