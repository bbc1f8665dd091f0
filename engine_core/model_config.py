"""Model architecture description shared by loaders, models, the executor and the scheduler.

One `ModelConfig` describes every supported decoder (Llama / SmolLM2 / Mistral, Qwen2, Qwen3). It is
built from an HF `config.json` dict (`from_hf_config`), from GGUF metadata (`from_gguf`) or from a
JSON file holding our own field names (`from_dict`). Everything is validated once here so the model
code can trust it.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# HF `architectures[0]` class names -> our architecture name (used when model_type is missing).
_HF_CLASS_TO_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # normalised: {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (always on for Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"  # dtype the checkpoint was published in (a hint only)
    # Not implemented by the attention path: the engine must cap max_model_len at this (see
    # `max_model_len_limit`). None for nearly every modern checkpoint.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # architectural facts the config.json does not always spell out
        if arch == "qwen2":
            self.attention_bias = True
        if arch == "qwen3":
            self.qk_norm = True
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0):
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if not isinstance(self.eos_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.eos_token_ids
        ):
            raise ValueError(f"ModelConfig.eos_token_ids must be a list of ints, got {self.eos_token_ids!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_model_len_limit(self) -> int:
        """Longest context this config supports with full (non-windowed) attention."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_config(self) -> dict[str, Any]:
        """An HF `config.json` dict that `from_hf_config` reads back as this config (for
        checkpoints written from a GGUF source, e.g. engine_core.tools.quantize_fp8)."""
        cls_name = {arch: name for name, arch in _HF_CLASS_TO_ARCH.items()}[self.architecture]
        cfg: dict[str, Any] = {
            "architectures": [cls_name], "model_type": self.architecture, "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id, "torch_dtype": self.torch_dtype,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "sliding_window": self.sliding_window,
        }
        if self.architecture in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = self.sliding_window is not None
        return cfg

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Our own field names (as written by `to_dict`). Unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"ModelConfig is missing required field(s): {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Either an HF config.json dict or our own `to_dict()` form (recognised by 'architecture')."""
        if isinstance(d.get("architecture"), str) and "model_type" not in d:
            return cls.from_dict(d)
        return cls.from_hf_config(d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")  # noqa: TRY004 - config errors are ValueErrors
        return cls.from_json_dict(d)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x or 5.x spelling)."""
        arch = _hf_architecture(cfg)

        def req(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(f"config.json is missing required field {key!r}")
            return cfg[key]

        hidden = req("hidden_size")
        n_heads = req("num_attention_heads")
        n_kv = cfg.get("num_key_value_heads") or n_heads
        head_dim = cfg.get("head_dim") or (hidden // n_heads if n_heads else 0)

        if cfg.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")

        # Rope: transformers >= 5 writes `rope_parameters` (with rope_theta inside); 4.x writes
        # `rope_theta` + `rope_scaling`.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params:
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}

        if arch == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v bias; config.json has no flag for it
        else:
            attention_bias = bool(cfg.get("attention_bias", False))

        sliding_window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding_window = None

        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(t) for t in eos])

        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_hidden_layers=req("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            vocab_size=req("vocab_size"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=(arch == "qwen3"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            sliding_window=sliding_window,
        )

    @classmethod
    def from_gguf(cls, reader_or_metadata: Any, tensor_names: list[str] | None = None) -> ModelConfig:
        """Build from a `gguf.GGUFReader`, a path to a .gguf file, or a plain metadata dict
        ({"general.architecture": "llama", "llama.block_count": 30, ...}).

        Tied embeddings are detected from the tensor list (no `output.weight`); pass `tensor_names`
        with a metadata dict, otherwise tied embeddings are assumed only if the dict says nothing.
        """
        if isinstance(reader_or_metadata, (str, os.PathLike)):
            from engine_core.loader.gguf_loader import open_gguf

            reader_or_metadata = open_gguf(reader_or_metadata)
        if isinstance(reader_or_metadata, dict):
            meta = reader_or_metadata
        else:
            meta = gguf_metadata(reader_or_metadata)
            if tensor_names is None:
                tensor_names = [t.name for t in reader_or_metadata.tensors]

        gguf_arch = meta.get("general.architecture")
        arch_map = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
        if gguf_arch not in arch_map:
            raise ValueError(
                f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(arch_map)}"
            )
        arch = arch_map[gguf_arch]
        p = gguf_arch + "."

        def req(key: str) -> Any:
            if p + key not in meta:
                raise ValueError(f"GGUF metadata is missing {p + key!r}")
            return meta[p + key]

        hidden = int(req("embedding_length"))
        n_heads = int(req("attention.head_count"))
        n_kv = int(meta.get(p + "attention.head_count_kv", n_heads))
        head_dim = int(meta.get(p + "attention.key_length", hidden // n_heads))
        vocab = meta.get(p + "vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else meta.get("tokenizer.ggml.tokens.count")
            if vocab is None:
                raise ValueError("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")

        rope_scaling = None
        scaling_type = meta.get(p + "rope.scaling.type")
        if scaling_type in ("linear",):
            rope_scaling = {"rope_type": "linear", "factor": float(meta[p + "rope.scaling.factor"])}
        elif scaling_type not in (None, "none"):
            raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported")
        if tensor_names is not None and "rope_freqs.weight" in tensor_names:
            # llama.cpp bakes Llama-3.1 "llama3" rope scaling into a rope_freqs tensor instead of
            # metadata; we'd need those per-frequency factors in our RotaryEmbedding.
            raise ValueError("GGUF files with a rope_freqs tensor (Llama-3.1 rope scaling) are not supported yet")

        if tensor_names is not None:
            tie = "output.weight" not in tensor_names
        else:
            tie = bool(meta.get("__tie_word_embeddings__", True))

        eos_ids: list[int] = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if meta.get(key) is not None and int(meta[key]) not in eos_ids:
                eos_ids.append(int(meta[key]))
        bos = meta.get("tokenizer.ggml.bos_token_id")

        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(req("feed_forward_length")),
            num_hidden_layers=int(req("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            vocab_size=int(vocab),
            # GGUF stores eps as float32 (1e-5 -> 9.99999974e-06); round-trip through float32 repr.
            rms_norm_eps=float(f"{float(meta.get(p + 'attention.layer_norm_rms_epsilon', 1e-6)):.7g}"),
            rope_theta=float(f"{float(meta.get(p + 'rope.freq_base', 10000.0)):.7g}"),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(meta.get(p + "context_length", 2048)),
            tie_word_embeddings=tie,
            attention_bias=(arch == "qwen2") or (tensor_names is not None and "blk.0.attn_q.bias" in tensor_names),
            qk_norm=(arch == "qwen3"),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            torch_dtype="bfloat16",
            sliding_window=None,
        )


_BIG_GGUF_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores")


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Plain {key: python value} view of a GGUFReader's metadata. The tokenizer's big arrays are
    replaced by their length under "<key>.count" (decoding 100k strings is slow and not needed)."""
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in _BIG_GGUF_ARRAYS:
            out[key + ".count"] = len(f.data)
            continue
        try:
            out[key] = f.contents()
        except Exception:  # noqa: BLE001, S112 - odd field types are not needed by us
            continue
    return out


def _hf_architecture(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type is None:
        archs = cfg.get("architectures") or []
        model_type = _HF_CLASS_TO_ARCH.get(archs[0]) if archs else None
        if model_type is None:
            raise ValueError(
                f"config.json has no model_type and unknown architectures {archs!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def _normalize_rope_scaling(rs: dict | None) -> dict | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"ModelConfig.rope_scaling must be a dict or None, got {rs!r}")  # noqa: TRY004
    rs = dict(rs)
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if "factor" not in rs:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    rs["factor"] = float(rs["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rs:
                raise ValueError(f"rope_scaling of type 'llama3' needs {key!r}")
    return {"rope_type": rope_type, **rs}
