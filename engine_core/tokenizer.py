"""Tokenizer wrapper: a thin layer over a Hugging Face fast tokenizer.

Two sources are supported, both fully offline:

* a GGUF file (``Tokenizer.from_gguf``): vocabulary, merges, special tokens and the chat template
  come from the file's metadata, converted by transformers' own GGUF tokenizer converter;
* a Hugging Face model directory with ``tokenizer.json`` / ``tokenizer_config.json``
  (``Tokenizer.from_pretrained``), loaded with ``local_files_only=True``.

``load_tokenizer(path)`` dispatches between the two.

BOS handling follows transformers exactly: ``encode(text)`` adds whatever the HF tokenizer's
post-processor adds (for SmolLM2 -- GGUF or HF -- that is nothing: no BOS is prepended).
Chat templates render their own special tokens, so ``apply_chat_template(tokenize=True)`` encodes
with ``add_special_tokens=False``, like transformers does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Tokenizer", "load_engine_tokenizer", "load_tokenizer"]

# Tokens that end a turn / a document in common chat models. Added to ``eos_token_ids`` when the
# vocabulary has them as *special* tokens (llama.cpp treats the same set as end-of-generation).
_EXTRA_EOS_TOKENS = (
    "<|im_end|>",  # ChatML (SmolLM2, Qwen, ...)
    "<|endoftext|>",
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
)

# GGUF architectures for which transformers' ``AutoTokenizer`` picks the generic
# ``TokenizersBackend`` class (their model types have no tokenizer class of their own). For these we
# skip ``AutoTokenizer``: it parses every field and tensor header of the GGUF with gguf.GGUFReader
# (~2.5 s for the 100 MB SmolLM2 file) and imports torch, only to build a model config that picks
# the tokenizer class; the tokenizer itself comes from the same GGUF converter either way
# (tests/unit/test_tokenizer.py checks the result is identical for the default model).
_GENERIC_BACKEND_GGUF_ARCHS = frozenset({"llama", "mistral", "phi3"})


def _import_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dependency is declared in pyproject
        raise ImportError("pagedserve's tokenizer needs `transformers` (pip install transformers)") from e
    return transformers


def _content_to_text(content: Any) -> str:
    """OpenAI message content -> plain text: str as is, None -> "", list of parts -> text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise ValueError(f"unsupported message content part: {part!r}")  # noqa: TRY004 (-> HTTP 400)
            ptype = part.get("type", "text")
            if ptype not in ("text", "input_text"):
                raise ValueError(f"unsupported message content part type {ptype!r}: this model only takes text")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError("a text content part needs a string 'text' field")  # noqa: TRY004
            texts.append(text)
        # Same joining rule as vLLM for string-content chat templates.
        return "\n".join(texts)
    raise ValueError(f"unsupported message content: {content!r}")


def _normalize_messages(messages: Iterable[dict]) -> list[dict]:
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"each chat message must be a dict with a 'role': got {m!r}")
        m = dict(m)
        m["content"] = _content_to_text(m.get("content"))
        out.append(m)
    return out


class Tokenizer:
    """Wraps a HF fast tokenizer (``transformers.PreTrainedTokenizerFast`` / ``TokenizersBackend``).

    Attributes: ``vocab_size`` (``len(hf)``, includes added tokens), ``eos_token_ids`` (primary
    EOS first), ``bos_token_id``, ``add_bos_token``, ``chat_template`` (settable; ``None`` means the
    model has none), ``name``. ``hf`` is the underlying HF tokenizer (for detokenizers and tests).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        name: str | None = None,
        eos_token_ids: Iterable[int] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._hf = hf_tokenizer
        self.name = name or str(getattr(hf_tokenizer, "name_or_path", "") or "tokenizer")
        # The Rust tokenizers.Tokenizer: fast decoding and the incremental detokenizer's DecodeStream.
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if self._backend is None:
            raise ValueError(f"{self.name}: only fast (tokenizers-backed) tokenizers are supported")
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.add_bos_token: bool = self._detect_add_bos()

        ids: list[int] = []
        for i in list(eos_token_ids or []) + [hf_tokenizer.eos_token_id]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        special = self._special_token_ids()
        vocab = hf_tokenizer.get_vocab()
        for tok in _EXTRA_EOS_TOKENS:
            i = vocab.get(tok)
            if i is not None and i in special and i not in ids:
                ids.append(i)
        self.eos_token_ids: list[int] = ids

        if chat_template is None:
            chat_template = getattr(hf_tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):  # named templates: use the default one
            chat_template = chat_template.get("default")
        self.chat_template: str | None = chat_template or None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata (offline, ~0.3 s for SmolLM2)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        _import_transformers()
        from transformers import PreTrainedTokenizerFast

        path = os.path.abspath(path)
        dirname, basename = os.path.split(path)
        metadata = _read_gguf_scalars(path)
        arch = metadata.get("general.architecture")
        if arch in _GENERIC_BACKEND_GGUF_ARCHS:
            # PreTrainedTokenizerFast is TokenizersBackend in transformers 5: the class AutoTokenizer
            # ends up with for these architectures, built by the same GGUF converter.
            hf = PreTrainedTokenizerFast.from_pretrained(dirname, gguf_file=basename, local_files_only=True)
        else:  # maybe a model-specific tokenizer class: let AutoTokenizer choose it (slower)
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(dirname, gguf_file=basename, local_files_only=True)

        eos = [metadata.get("tokenizer.ggml.eos_token_id"), metadata.get("tokenizer.ggml.eot_token_id")]
        name = basename[: -len(".gguf")] if basename.lower().endswith(".gguf") else basename
        return cls(
            hf,
            name=name,
            eos_token_ids=[int(i) for i in eos if i is not None],
            chat_template=metadata.get("tokenizer.chat_template") or None,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> Tokenizer:
        """Load from a local HF model directory (tokenizer.json etc.); never touches the network."""
        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"tokenizer directory not found: {model_dir}")
        _import_transformers()
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return cls(hf, name=os.path.basename(os.path.normpath(model_dir)), eos_token_ids=_generation_eos(model_dir))

    # ------------------------------------------------------------------ helpers

    def _special_token_ids(self) -> set[int]:
        decoder = getattr(self._hf, "added_tokens_decoder", None) or {}
        ids = {int(i) for i, t in decoder.items() if getattr(t, "special", False)}
        ids.update(getattr(self._hf, "all_special_ids", []) or [])
        return ids

    def _detect_add_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        # What the post-processor really does, whatever the config flags say.
        return self._hf.encode("a", add_special_tokens=True)[:1] == [self.bos_token_id]

    @property
    def hf(self) -> Any:
        """The underlying HF tokenizer."""
        return self._hf

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (Rust)."""
        return self._backend

    @property
    def all_special_ids(self) -> set[int]:
        return self._special_token_ids()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_raw(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode without HF's post-hoc ``clean_up_tokenization_spaces`` (straight through the Rust
        backend). Fast; what the tokenizer service and the incremental detokenizer use."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
        return self._hf.convert_ids_to_tokens(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return self._hf.convert_tokens_to_string(list(tokens))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the model's chat template.

        ``content`` may be a string, None, or a list of ``{"type": "text", "text": ...}`` parts
        (joined with newlines). Extra keyword arguments (``tools``, ``documents``, custom template
        variables) are passed to the template. With ``tokenize=True`` returns token ids, encoded
        with ``add_special_tokens=False`` since the template writes its own special tokens.
        """
        if not self.chat_template:
            raise ValueError(
                f"model has no chat template ({self.name}): use a completions request with a plain prompt, "
                "or supply a chat template"
            )
        text = self._hf.apply_chat_template(
            _normalize_messages(messages),
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


def _read_gguf_scalars(path: str) -> dict:
    """The GGUF's metadata with arrays left out (fast: transformers 5's header reader). Empty when
    this transformers has no such reader; ``from_gguf`` then just goes through AutoTokenizer."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:  # transformers < 5
        return {}
    metadata, _ = read_gguf_metadata(path)
    return metadata


def _generation_eos(model_dir: str) -> list[int]:
    """EOS ids from a model directory's generation_config.json / config.json (int or list)."""
    out: list[int] = []
    for fname in ("generation_config.json", "config.json"):
        p = os.path.join(model_dir, fname)
        if not os.path.isfile(p):
            continue
        try:
            with open(p, encoding="utf-8") as f:
                val = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for i in val if isinstance(val, list) else [val]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def _is_gguf_file(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_tokenizer(model_path: str) -> Tokenizer:
    """``*.gguf`` file -> ``Tokenizer.from_gguf``; directory -> ``Tokenizer.from_pretrained`` (or,
    when it has no tokenizer files but exactly one ``.gguf``, that GGUF)."""
    model_path = os.fspath(model_path)
    if os.path.isfile(model_path):
        if _is_gguf_file(model_path):
            return Tokenizer.from_gguf(model_path)
        raise ValueError(f"not a GGUF file or a model directory: {model_path}")
    if os.path.isdir(model_path):
        has_hf = any(
            os.path.isfile(os.path.join(model_path, f))
            for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        )
        if not has_hf:
            ggufs = sorted(f for f in os.listdir(model_path) if f.lower().endswith(".gguf"))
            if len(ggufs) == 1:
                return Tokenizer.from_gguf(os.path.join(model_path, ggufs[0]))
        return Tokenizer.from_pretrained(model_path)
    raise FileNotFoundError(f"model path not found: {model_path}")


def load_engine_tokenizer(config: Any, executor: Any = None) -> Tokenizer | None:
    """The engine's tokenizer: config.tokenizer, else the in-process executor's model (None for a
    dummy model or a remote executor: token ids only, no structured output)."""
    path = config.tokenizer
    if path is None:
        source = getattr(executor, "source", None)
        if source is None or source.kind == "dummy":
            return None
        path = source.path
    if path == "default":
        from engine_core.loader.model_source import embedded_gguf_path

        path = embedded_gguf_path()
    return load_tokenizer(path)
