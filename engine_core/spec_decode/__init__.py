"""Speculative decoding (docs/speculative_decoding.md): a proposer drafts k tokens per request in the
executor, the target model verifies them in one forward pass and the rejection sampler keeps an
exact sample of the target distribution."""
from engine_core.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
