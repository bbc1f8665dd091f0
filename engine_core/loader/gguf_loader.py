"""Weights from a GGUF file: dequantise every tensor (any ggml type gguf-py knows), map llama.cpp
tensor names to HF names, and undo llama.cpp's q/k row permutation.

llama.cpp's converter permutes the rows of Llama q/k projections so that its RoPE can rotate
adjacent channel pairs (2i, 2i+1); HF-style rotate_half pairs channel i with i + head_dim/2.
`reverse_permute` is the inverse, identical to transformers' GGUF loader
(modeling_gguf_pytorch_utils.LlamaTensorProcessor._reverse_permute_weights). Qwen2/Qwen3 GGUFs are
not permuted by the converter, so nothing is undone for them.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator

import numpy as np
import torch

from engine_core.loader.gguf_q4_1 import Q4_1_GROUP, Q4_1Weight
from engine_core.model_config import ModelConfig

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_PERMUTED_ARCHS = ("llama", "mistral")


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def open_gguf(path: str | os.PathLike):
    """GGUFReader for `path`, cached: parsing the metadata (tokenizer arrays) takes seconds, and
    resolve_model + load_model would otherwise parse the file twice."""
    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    return _open_gguf(path, st.st_mtime_ns, st.st_size)


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, suffix = m.groups()
        hf = _BLOCK.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    base, _, suffix = name.rpartition(".")
    hf = _TOP_LEVEL.get(base)
    return None if hf is None else f"{hf}.{suffix}"


def reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's permute(w, n_head) on the rows of a q/k weight [n_head*D, ...] (or bias)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUFReader tensor -> float32 array in torch layout (GGUF lists dims fastest-first)."""
    from gguf.quants import dequantize

    arr = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(list(tensor.shape)))
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"GGUF tensor {tensor.name}: {arr.size} values, expected shape {shape}")
    arr = arr.reshape(shape)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # memory-mapped F32 tensors
        arr = np.array(arr, dtype=np.float32, order="C")
    return arr


def _load_tensor(tensor, keep_q4_1: bool) -> torch.Tensor | Q4_1Weight:
    from gguf import GGMLQuantizationType

    shape = tuple(int(d) for d in reversed(list(tensor.shape)))
    if (keep_q4_1 and tensor.tensor_type == GGMLQuantizationType.Q4_1 and len(shape) == 2
            and shape[1] % Q4_1_GROUP == 0):
        return Q4_1Weight.from_blocks(tensor.data, shape)
    return torch.from_numpy(dequantize_tensor(tensor))


def iter_gguf_weights(reader_or_path, config: ModelConfig, keep_q4_1: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | Q4_1Weight]]:
    """Yield (HF name, float32 CPU tensor) for every tensor in the file, one at a time.
    keep_q4_1 (--quantization int4): Q4_1 matrices come as their codes (Q4_1Weight), which int4
    layers take as they are and any other layer dequantizes (`materialize()`)."""
    reader = open_gguf(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    permuted = config.architecture in _PERMUTED_ARCHS
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no counterpart in our {config.architecture} model")
        w = _load_tensor(tensor, keep_q4_1)
        n_head = None
        if permuted:
            if ".self_attn.q_proj." in hf_name:
                n_head = config.num_attention_heads
            elif ".self_attn.k_proj." in hf_name:
                n_head = config.num_key_value_heads
        if n_head is not None:
            w = (w.permute_rows(lambda t, h=n_head: reverse_permute(t, h)) if isinstance(w, Q4_1Weight)
                 else reverse_permute(w, n_head))
        yield hf_name, w
