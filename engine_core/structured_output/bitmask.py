"""Applying the batch's allowed-token bitmasks to the logits, on the executor's device, in one op."""
from __future__ import annotations

import numpy as np
import torch


class BitmaskApplier:
    """Sets logits[r, t] = -inf wherever bit t of row r's bitmask is 0 (in place).

    Bitmasks are [words] int32 per constrained row (bit t of word t // 32, little-endian bit order:
    xgrammar's layout); unconstrained rows get all ones. The batch's rows are assembled on the host
    into a reused pinned buffer (two, alternating, each guarded by an event so a buffer is never
    rewritten while its copy is in flight), sent with one non-blocking copy, and applied by
    xgrammar's kernel (CUDA / Triton / CPU), or by a torch fallback without xgrammar.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._next = 0
        try:
            import xgrammar as xgr

            self._xgr_apply = xgr.apply_token_bitmask_inplace
        except ImportError:  # pragma: no cover - xgrammar is a dependency
            self._xgr_apply = None

    def _host_buffer(self, rows: int, words: int) -> tuple[int, torch.Tensor]:
        """(index, a [rows, words] view of the next free buffer)."""
        cuda = self.device.type == "cuda"
        if len(self._buffers) < 2:
            self._buffers.append((torch.empty(0, dtype=torch.int32), None))
        i = self._next
        self._next = (i + 1) % 2
        buf, event = self._buffers[i]
        if event is not None:
            event.synchronize()  # its previous copy has left
        if buf.numel() < rows * words:
            buf = torch.empty(max(rows * words, 2 * buf.numel()), dtype=torch.int32, pin_memory=cuda)
        self._buffers[i] = (buf, None)
        return i, buf[: rows * words].view(rows, words)

    def apply(self, logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> None:
        if not rows:
            return
        n, vocab = logits.shape
        words = bitmask.shape[1]
        i, host = self._host_buffer(n, words)
        hv = host.numpy()
        if len(rows) == n:
            hv[rows] = bitmask
        else:
            hv.fill(-1)
            hv[rows] = bitmask
        if self.device.type == "cuda":
            mask = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._buffers[i] = (self._buffers[i][0], event)
        else:
            mask = host
        if self._xgr_apply is not None:
            self._xgr_apply(logits, mask, vocab_size=min(vocab, words * 32))
            return
        bits = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((mask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
        if allowed.shape[1] < vocab:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
        logits.masked_fill_(~allowed, float("-inf"))
