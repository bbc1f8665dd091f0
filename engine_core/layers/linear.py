"""Linear layers whose parameters are created uninitialised (torch.empty) so that building a model
under `with torch.device(target)` costs only the allocation, and fused layers (QKV, gate|up) that
know how to load their shards from separately named checkpoint tensors.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` attribute, which
the models' `load_weights` call (the vLLM / nano-vllm convention). The loaders are closures over
plain shard offsets, not bound methods, so parameters hold no reference back to their module
(no reference cycle: a deleted model frees its memory at once, without waiting for the GC).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if shard_id is not None:
        raise ValueError(f"parameter is not fused, got shard {shard_id!r}")
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded_weight.shape)}")
    with torch.no_grad():
        param.copy_(loaded_weight)


def sharded_weight_loader(output_sizes: list[int], shard_names: list | None = None) -> Callable:
    """Loader for a parameter made of sub-projections stacked along dim 0; shard_id is an index
    into output_sizes or one of shard_names. shard_id=None loads the whole fused tensor."""
    offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
    names = list(shard_names or [])

    def loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded_weight)
            return
        index = names.index(shard_id) if shard_id in names else shard_id
        if not isinstance(index, int) or not 0 <= index < len(output_sizes):
            raise ValueError(f"unknown shard {shard_id!r}")
        expected = (output_sizes[index], *param.shape[1:])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"shard {shard_id!r}: expected shape {expected}, checkpoint has {tuple(loaded_weight.shape)}")
        with torch.no_grad():
            param.narrow(0, offsets[index], output_sizes[index]).copy_(loaded_weight)

    return loader


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (e.g. gate|up);
    shard_id is the index of the sub-projection (or its name, if shard_names is given)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 shard_names: list | None = None) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        loader = sharded_weight_loader(self.output_sizes, shard_names)
        self.weight.weight_loader = loader
        if self.bias is not None:
            self.bias.weight_loader = loader


class QKVLinear(MergedLinear):
    """q, k and v projections fused: output = [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]; shard_id 'q'|'k'|'v'."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias, shard_names=["q", "k", "v"])


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(Linear):
    """Projects final hidden states to vocab logits; may share its weight with the embedding."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)
