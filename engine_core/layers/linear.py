"""Linear layers whose parameters are created uninitialised (torch.empty) so that building a model
under `with torch.device(target)` costs only the allocation, and fused layers (QKV, gate|up) that
know how to load their shards from separately named checkpoint tensors.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` attribute, which
the models' `load_weights` call (the vLLM / nano-vllm convention). The loaders are closures over
plain shard offsets, not bound methods, so parameters hold no reference back to their module
(no reference cycle: a deleted model frees its memory at once, without waiting for the GC).

Tensor parallelism (engine_core/distributed.py): every layer takes an optional `tp` (TPGroup).
- column-parallel (QKVLinear, MergedLinear, ColumnParallelLinear): output rows split, no
  communication; QKV splits Q heads and splits or replicates KV heads;
- row-parallel (RowParallelLinear, for o_proj / down_proj): input columns split, all-reduce after;
- VocabEmbedding / LMHead: vocab rows split (padded to a multiple of N); the embedding masks ids of
  other ranks and all-reduces, the head all-gathers logits to the full vocab on every rank.
Each rank's loader takes only its rows/columns of the (full, unsharded) checkpoint tensor; a
loaded tensor may also be a lazy slice (safetensors_loader.LazyTensor) so only those bytes are
read. Every parameter records `full_shape`, the shape of the unsharded tensor (dummy weights).
At world_size 1 (tp=None) shapes, loaders and forwards are exactly the unsharded ones.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.distributed import TPGroup, attention_shard, divide, vocab_shard

_SINGLE = TPGroup()


def _tensor(w) -> torch.Tensor:
    """A loaded weight as a tensor (lazy checkpoint slices are read here)."""
    return w if isinstance(w, torch.Tensor) else w.materialize()


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if shard_id is not None:
        raise ValueError(f"parameter is not fused, got shard {shard_id!r}")
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded_weight.shape)}")
    with torch.no_grad():
        param.copy_(_tensor(loaded_weight))


def sharded_weight_loader(output_sizes: list[int], shard_names: list | None = None,
                          rank_slices: list[tuple[int, int]] | None = None, dim: int = 0) -> Callable:
    """Loader for a parameter made of sub-projections stacked along dim 0 (global sizes
    output_sizes); shard_id is an index into output_sizes or one of shard_names. This rank keeps
    rows [start, start + length) of sub-projection i (rank_slices[i]; default: all of it), stored
    one after the other. shard_id=None loads the whole fused tensor (each sub-projection sliced).
    dim=1 (row-parallel, one sub-projection): the slice is taken along the input dim instead."""
    slices = list(rank_slices) if rank_slices is not None else [(0, s) for s in output_sizes]
    names = list(shard_names or [])
    global_offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
    local_offsets = [sum(length for _, length in slices[:i]) for i in range(len(slices))]
    whole = all(start == 0 and length == size for (start, length), size in zip(slices, output_sizes))

    def load_one(param: nn.Parameter, w, index: int, shard_id) -> None:
        start, length = slices[index]
        if dim == 0:
            expected = (output_sizes[index], *param.shape[1:])
            target = param.narrow(0, local_offsets[index], length)
        else:
            expected = (param.shape[0], output_sizes[index])
            target = param
        if tuple(w.shape) != expected:
            what = "shape mismatch: parameter expects" if shard_id is None else f"shard {shard_id!r}: expected shape"
            raise ValueError(f"{what} {expected}, checkpoint has {tuple(w.shape)}")
        if length != output_sizes[index]:
            w = w.narrow(dim, start, length)
        with torch.no_grad():
            target.copy_(_tensor(w))

    def loader(param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if shard_id is None:
            if whole:  # unsharded: the fused tensor as one (the single-device path)
                default_weight_loader(param, loaded_weight)
                return
            total = sum(output_sizes)
            if dim == 0 and tuple(loaded_weight.shape) != (total, *param.shape[1:]):
                raise ValueError(f"shape mismatch: parameter expects {(total, *param.shape[1:])}, "
                                 f"checkpoint has {tuple(loaded_weight.shape)}")
            for i, size in enumerate(output_sizes):
                w = loaded_weight if len(output_sizes) == 1 else loaded_weight.narrow(0, global_offsets[i], size)
                load_one(param, w, i, None)
            return
        index = names.index(shard_id) if shard_id in names else shard_id
        if not isinstance(index, int) or not 0 <= index < len(output_sizes):
            raise ValueError(f"unknown shard {shard_id!r}")
        load_one(param, loaded_weight, index, shard_id)

    return loader


def _vocab_weight_loader(vocab_size: int, start: int, length: int) -> Callable:
    """Rows [start, start + length) of a [vocab, hidden] tensor; padding rows are zeroed."""

    def loader(param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not fused, got shard {shard_id!r}")
        expected = (vocab_size, *param.shape[1:])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"shape mismatch: parameter expects {expected}, checkpoint has {tuple(loaded_weight.shape)}")
        with torch.no_grad():
            if length:
                param[:length].copy_(_tensor(loaded_weight.narrow(0, start, length)))
            param[length:].zero_()

    return loader


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out_features, in_features]. Replicated on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.weight.full_shape = (out_features, in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
            self.bias.full_shape = (out_features,)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (e.g. gate|up);
    shard_id is the index of the sub-projection (or its name, if shard_names is given).
    Column-parallel: each rank holds rows rank_slices[i] of sub-projection i (default: every
    sub-projection split evenly over tp)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 shard_names: list | None = None, tp: TPGroup | None = None,
                 rank_slices: list[tuple[int, int]] | None = None) -> None:
        tp = tp or _SINGLE
        if rank_slices is None:
            rank_slices = []
            for size in output_sizes:
                length = divide(size, tp.world_size, "the output size of a column-parallel layer")
                rank_slices.append((tp.rank * length, length))
        super().__init__(in_features, sum(length for _, length in rank_slices), bias)
        self.tp = tp
        self.output_sizes = [length for _, length in rank_slices]  # this rank's sub-projections
        loader = sharded_weight_loader(list(output_sizes), shard_names, rank_slices)
        self.weight.weight_loader = loader
        self.weight.full_shape = (sum(output_sizes), in_features)
        if self.bias is not None:
            self.bias.weight_loader = loader
            self.bias.full_shape = (sum(output_sizes),)


class ColumnParallelLinear(MergedLinear):
    """One projection, output rows split over the ranks (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__(in_features, [out_features], bias, tp=tp)


class QKVLinear(MergedLinear):
    """q, k and v projections fused: output = [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]; shard_id 'q'|'k'|'v'.
    With tp, head counts and sizes are this rank's: its Q heads and the KV heads they use."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TPGroup | None = None) -> None:
        tp = tp or _SINGLE
        shard = attention_shard(num_heads, num_kv_heads, tp.world_size, tp.rank)
        self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
        self.q_size = shard.num_heads * head_dim
        self.kv_size = shard.num_kv_heads * head_dim
        kv_slice = (shard.kv_head_start * head_dim, self.kv_size)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, shard_names=["q", "k", "v"], tp=tp,
                         rank_slices=[(shard.q_head_start * head_dim, self.q_size), kv_slice, kv_slice])


class RowParallelLinear(Linear):
    """y = all_reduce(x_r W_r^T) (+ b): input columns split over the ranks (x arrives split, as the
    column-parallel layer before it produced it); the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup | None = None) -> None:
        tp = tp or _SINGLE
        local_in = divide(in_features, tp.world_size, "the input size of a row-parallel layer")
        super().__init__(local_in, out_features, bias)
        self.tp = tp
        self.weight.weight_loader = sharded_weight_loader([in_features], rank_slices=[(tp.rank * local_in, local_in)],
                                                          dim=1)
        self.weight.full_shape = (out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """Token embedding; with tp, rank r holds vocab rows [r*P, (r+1)*P), P = ceil(vocab/N)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        tp = tp or _SINGLE
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rows_per_rank, self.vocab_start, real = vocab_shard(num_embeddings, tp.world_size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = (default_weight_loader if tp.world_size == 1 else
                                     _vocab_weight_loader(num_embeddings, self.vocab_start, real))
        self.weight.full_shape = (num_embeddings, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class LMHead(Linear):
    """Projects final hidden states to vocab logits; may share its weight with the embedding (same
    vocab sharding). With tp every rank computes its vocab slice and all-gathers the full logits,
    so every rank samples the same tokens from bitwise-identical logits."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup | None = None) -> None:
        tp = tp or _SINGLE
        rows, start, real = vocab_shard(vocab_size, tp.world_size, tp.rank)
        super().__init__(hidden_size, rows, bias=False)
        self.tp = tp
        self.vocab_size = vocab_size
        if tp.world_size > 1:
            self.weight.weight_loader = _vocab_weight_loader(vocab_size, start, real)
        self.weight.full_shape = (vocab_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight, self.bias)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
