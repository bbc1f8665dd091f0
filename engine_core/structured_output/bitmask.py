"""Applying the batch's allowed-token bitmasks to the logits, on the executor's device, in one op."""
from __future__ import annotations

import numpy as np
import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> None:
    """Set logits[rows[i], t] = -inf wherever bit t of bitmask[i] is 0 (in place).

    bitmask: [R, words] int32 (bit t of word t // 32, little-endian bit order: xgrammar's layout).
    Uses xgrammar's kernel (CUDA / Triton / CPU) when it is installed, a torch fallback otherwise.
    """
    if not rows:
        return
    mask = torch.from_numpy(np.ascontiguousarray(bitmask, dtype=np.int32))
    if logits.device.type != "cpu":
        mask = mask.pin_memory().to(logits.device, non_blocking=True)
    vocab = logits.shape[-1]
    try:
        import xgrammar as xgr
    except ImportError:
        xgr = None
    if xgr is not None:
        full = mask
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            # xgrammar takes one mask row per logits row, and `indices` names the rows to mask.
            full = torch.full((logits.shape[0], mask.shape[1]), -1, dtype=torch.int32, device=mask.device)
            full[torch.as_tensor(rows, device=mask.device)] = mask
        xgr.apply_token_bitmask_inplace(logits, full, vocab_size=min(vocab, full.shape[1] * 32))
        return
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    idx = torch.as_tensor(rows, device=logits.device)
    logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))
