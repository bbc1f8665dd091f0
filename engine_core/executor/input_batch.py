"""The executor's persistent per-request state as numpy rows (after vLLM v1's InputBatch/BlockTable).

Each request the executor holds owns one row: its token ids, how many are known on the host
(`num_tokens`) and computed (`num_computed`), its block table and its sampling params. A step's
deltas only touch the rows they name (add / drop a request, append block ids, append sampled
tokens), and a step's model inputs are gathered from the rows with vectorised numpy: no per-token
Python, whatever the batch size.

With async scheduling a scheduled position may hold a token that is still being sampled on the
device by the previous step ("pending"): `prepare` reports those positions so the model runner
fills them on the device (the host never waits for them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_core.executor.base import ExecutorError
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler_output import NewRequestData, SchedulerOutput


@dataclass
class StepInputs:
    """One step's model inputs on the host, in batch order (decode-first)."""

    req_ids: list[str]
    rows: np.ndarray  # [B] int64 batch position -> persistent row
    query_lens: np.ndarray  # [B] int64
    input_ids: np.ndarray  # [T] int64 (0 at pending positions)
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B+1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32, padded with block 0
    num_decodes: int
    sample_idx: np.ndarray  # [S] int64 batch positions of requests that sample this step
    logits_rows: np.ndarray  # [S] int64 flat token index whose hidden state predicts the next token
    pending_flat: np.ndarray  # [P] int64 flat token indices whose input id is still on the device
    pending_src: np.ndarray  # [P] int64 index into the previous step's sampled-token tensor
    num_pending: np.ndarray  # [S] int64 pending (not yet host-known) output tokens per sampling request
    # [S] int64 speculative draft tokens each sampling request verifies (its last num_spec + 1 rows
    # all get logits); None when the step has none.
    num_spec: np.ndarray | None = None


def _grow(a: np.ndarray, rows: int | None = None, cols: int | None = None, fill: int = 0) -> np.ndarray:
    r = a.shape[0] if rows is None else rows
    shape = (r,) + a.shape[1:] if cols is None else (r, cols)
    if shape == a.shape:
        return a
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


class InputBatch:
    def __init__(self, block_size: int, max_model_len: int, initial_rows: int = 64,
                 initial_width: int = 1024) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.row_of: dict[str, int] = {}
        self.params: list[SamplingParams | None] = [None] * initial_rows
        self.free_rows: list[int] = list(range(initial_rows - 1, -1, -1))
        width = min(initial_width, max_model_len + 1)
        self.token_ids = np.zeros((initial_rows, width), dtype=np.int64)
        self.prompt_len = np.zeros(initial_rows, dtype=np.int64)
        self.num_tokens = np.zeros(initial_rows, dtype=np.int64)  # known on the host
        self.num_computed = np.zeros(initial_rows, dtype=np.int64)
        self.block_table = np.zeros((initial_rows, max(1, -(-width // block_size))), dtype=np.int32)
        self.num_blocks = np.zeros(initial_rows, dtype=np.int64)
        # Bumped whenever a row changes hands, so late results of a dropped request cannot land
        # in the row's next owner.
        self.generation = np.zeros(initial_rows, dtype=np.int64)
        # Sampling state that depends on nothing but the params (no seed, penalties, min_tokens):
        # the step's sampling tensors can be reused while the sampling rows stay the same.
        self.stateless = np.zeros(initial_rows, dtype=bool)

    # ------------------------------------------------------------------ capacity
    def _ensure_rows(self) -> None:
        if self.free_rows:
            return
        old = len(self.params)
        new = old * 2
        for name in ("token_ids", "prompt_len", "num_tokens", "num_computed", "block_table", "num_blocks",
                     "generation", "stateless"):
            setattr(self, name, _grow(getattr(self, name), rows=new))
        self.params += [None] * (new - old)
        self.free_rows = list(range(new - 1, old - 1, -1))

    def _ensure_width(self, tokens: int) -> None:
        w = self.token_ids.shape[1]
        if tokens > w:
            self.token_ids = _grow(self.token_ids, cols=max(tokens, min(2 * w, self.max_model_len + 1)))

    def _ensure_blocks(self, blocks: int) -> None:
        w = self.block_table.shape[1]
        if blocks > w:
            self.block_table = _grow(self.block_table, cols=max(blocks, 2 * w))

    # ------------------------------------------------------------------ deltas
    def add(self, new: NewRequestData) -> int:
        if new.req_id in self.row_of:
            self.remove(new.req_id)  # resumed without a drop first: the new state wins
        self._ensure_rows()
        row = self.free_rows.pop()
        toks = list(new.prompt_token_ids) + list(new.output_token_ids)
        self._ensure_width(len(toks) + 1)
        self._ensure_blocks(len(new.block_ids))
        self.row_of[new.req_id] = row
        self.params[row] = p = new.sampling_params
        self.stateless[row] = p.seed is None and not p.needs_penalties and p.min_tokens == 0
        self.token_ids[row, : len(toks)] = toks
        self.prompt_len[row] = len(new.prompt_token_ids)
        self.num_tokens[row] = len(toks)
        self.num_computed[row] = new.num_computed_tokens
        self.block_table[row, : len(new.block_ids)] = new.block_ids
        self.num_blocks[row] = len(new.block_ids)
        self.generation[row] += 1
        return row

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is None:
            return
        self.params[row] = None
        self.generation[row] += 1
        self.free_rows.append(row)

    def append_blocks(self, req_id: str, num_computed_tokens: int, block_ids: list[int],
                      replaced: list[tuple[int, int]] | None = None) -> None:
        row = self.row_of.get(req_id)
        if row is None:
            raise ExecutorError(f"executor has no state for request {req_id!r} (out of sync)")
        if self.num_computed[row] != num_computed_tokens:
            raise ExecutorError(
                f"request {req_id!r}: executor has {int(self.num_computed[row])} computed tokens, "
                f"scheduler says {num_computed_tokens}")
        for i, block_id in replaced or ():  # copy-on-write: the shared block became a private copy
            if not 0 <= i < int(self.num_blocks[row]):
                raise ExecutorError(f"request {req_id!r}: replaced block index {i} outside its table")
            self.block_table[row, i] = block_id
        if block_ids:
            n = int(self.num_blocks[row])
            self._ensure_blocks(n + len(block_ids))
            self.block_table[row, n : n + len(block_ids)] = block_ids
            self.num_blocks[row] = n + len(block_ids)

    def append_sampled(self, rows: np.ndarray, generations: np.ndarray, tokens: np.ndarray) -> None:
        """Sampled tokens land on the host (rows that changed hands since are skipped)."""
        live = self.generation[rows] == generations
        rows, tokens = rows[live], tokens[live]
        if rows.size == 0:
            return
        self._ensure_width(int(self.num_tokens[rows].max()) + 2)
        self.token_ids[rows, self.num_tokens[rows]] = tokens
        self.num_tokens[rows] += 1

    def output_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, self.prompt_len[row] : self.num_tokens[row]]

    def prompt_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, : self.prompt_len[row]]

    # ------------------------------------------------------------------ one step's inputs
    def prepare(self, so: SchedulerOutput, pending_rows: np.ndarray | None,
                pending_generations: np.ndarray | None) -> StepInputs:
        """Gather the step's inputs and advance num_computed. `pending_rows[i]` (with its row
        generation) is the row whose next token is entry i of the previous step's sampled-token
        tensor, not yet on the host."""
        sched = so.num_scheduled_tokens
        # Decode-first (stable within each group): attention runs all decodes as one batch.
        req_ids = [r for r, n in sched.items() if n == 1] + [r for r, n in sched.items() if n != 1]
        num_decodes = sum(1 for n in sched.values() if n == 1)
        try:
            rows = np.fromiter((self.row_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        except KeyError as e:
            raise ExecutorError(f"request {e.args[0]!r} scheduled but unknown to the executor") from None
        q = np.fromiter((sched[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        bs = self.block_size
        start = self.num_computed[rows]
        end = start + q
        known = self.num_tokens[rows]

        # A row may be one token ahead of the host: the token the previous step is sampling.
        src_of_row = None
        if pending_rows is not None and pending_rows.size:
            live = self.generation[pending_rows] == pending_generations
            src_of_row = np.full(self.num_tokens.shape[0], -1, dtype=np.int64)
            src_of_row[pending_rows[live]] = np.flatnonzero(live)
            ahead = src_of_row[rows] >= 0
            limit = known + ahead
        else:
            ahead = np.zeros(len(rows), dtype=bool)
            limit = known
        spec = self._write_drafts(so.scheduled_spec_decode_tokens, req_ids, rows, known, end) \
            if so.scheduled_spec_decode_tokens else None
        if spec is not None:
            limit = limit + spec  # drafts are scheduled positions whose ids the step itself brings
        bad = np.flatnonzero(end > limit)
        if bad.size:
            i = int(bad[0])
            raise ExecutorError(f"request {req_ids[i]!r}: {int(q[i])} tokens scheduled at {int(start[i])}, "
                                f"only {int(limit[i])} known")
        need_blocks = -(-end // bs)
        bad = np.flatnonzero(need_blocks > self.num_blocks[rows])
        if bad.size:
            i = int(bad[0])
            raise ExecutorError(f"request {req_ids[i]!r}: {int(end[i])} tokens need more than its "
                                f"{int(self.num_blocks[rows[i]])} blocks")

        T = int(q.sum())
        qsl = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(q, out=qsl[1:])
        tok_row = np.repeat(rows, q)
        positions = np.arange(T, dtype=np.int64) - np.repeat(qsl[:-1] - start, q)
        is_pending = positions >= np.repeat(known if spec is None else known + spec, q)
        input_ids = self.token_ids[tok_row, np.minimum(positions, self.token_ids.shape[1] - 1)]
        pending_flat = np.flatnonzero(is_pending)
        if pending_flat.size:
            input_ids[pending_flat] = 0
            pending_src = src_of_row[tok_row[pending_flat]]
        else:
            pending_src = pending_flat
        slot_mapping = self.block_table[tok_row, positions // bs].astype(np.int64) * bs + positions % bs
        max_blocks = int(need_blocks.max())
        block_tables = self.block_table[rows, :max_blocks]
        # Only columns below a row's own need are read by the kernels; zero the rest so a padded
        # gather never reads a stale (maybe reassigned) block.
        block_tables = np.where(np.arange(max_blocks)[None, :] < need_blocks[:, None], block_tables, 0)

        # Every known (or pending) token computed: the last row's hidden state predicts the next.
        samples = end == limit
        sample_idx = np.flatnonzero(samples)
        self.num_computed[rows] = end
        return StepInputs(
            req_ids=req_ids, rows=rows, query_lens=q, input_ids=input_ids, positions=positions,
            slot_mapping=slot_mapping, query_start_loc=qsl.astype(np.int32), seq_lens=end.astype(np.int32),
            block_tables=block_tables.astype(np.int32, copy=False), num_decodes=num_decodes,
            sample_idx=sample_idx, logits_rows=qsl[1:][sample_idx] - 1, pending_flat=pending_flat,
            pending_src=pending_src, num_pending=ahead[sample_idx].astype(np.int64),
            num_spec=None if spec is None else spec[sample_idx],
        )

    def _write_drafts(self, spec: dict[str, list[int]], req_ids: list[str], rows: np.ndarray,
                      known: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Put each request's draft tokens right after its known tokens (num_tokens is not advanced:
        only the accepted ones become the request's tokens, see append_tokens). Drafts must be the
        step's last scheduled positions, so a verifying request always samples."""
        n = np.zeros(len(rows), dtype=np.int64)
        for i, rid in enumerate(req_ids):
            d = spec.get(rid)
            if not d:
                continue
            row, k = int(rows[i]), len(d)
            if int(end[i]) != int(known[i]) + k:
                raise ExecutorError(f"request {rid!r}: {k} draft tokens must be the last scheduled positions "
                                    f"({int(known[i])} known tokens, computing up to {int(end[i])})")
            self._ensure_width(int(known[i]) + k + 1)
            self.token_ids[row, int(known[i]): int(known[i]) + k] = d
            n[i] = k
        return n

    def append_tokens(self, row: int, tokens: list[int], num_rejected: int) -> None:
        """A verifying step's result: the accepted drafts + one sampled token become the row's
        tokens, and the rejected drafts' positions count as not computed (their KV slots are
        overwritten by later steps)."""
        n = int(self.num_tokens[row])
        self._ensure_width(n + len(tokens) + 1)
        self.token_ids[row, n: n + len(tokens)] = tokens
        self.num_tokens[row] = n + len(tokens)
        self.num_computed[row] -= num_rejected
