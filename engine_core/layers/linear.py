"""Linear layers whose parameters are created uninitialised (torch.empty) so that building a model
under `with torch.device(target)` costs only the allocation, and fused layers (QKV, gate|up) that
know how to load their shards from separately named checkpoint tensors.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` attribute, which
the models' `load_weights` call (the vLLM / nano-vllm convention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded_weight.shape)}")
    with torch.no_grad():
        param.copy_(loaded_weight)


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (e.g. gate|up).
    shard_id is the index of the sub-projection."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def shard_range(self, shard_id) -> tuple[int, int]:
        offset = sum(self.output_sizes[:shard_id])
        return offset, self.output_sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # the fused tensor itself (e.g. our own state_dict)
            default_weight_loader(param, loaded_weight)
            return
        offset, size = self.shard_range(shard_id)
        expected = (size, *param.shape[1:])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"shard {shard_id!r}: expected shape {expected}, checkpoint has {tuple(loaded_weight.shape)}")
        with torch.no_grad():
            param.narrow(0, offset, size).copy_(loaded_weight)


class QKVLinear(MergedLinear):
    """q, k and v projections fused: output = [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]; shard_id 'q'|'k'|'v'."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def shard_range(self, shard_id) -> tuple[int, int]:
        index = {"q": 0, "k": 1, "v": 2}[shard_id] if isinstance(shard_id, str) else shard_id
        return super().shard_range(index)


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
