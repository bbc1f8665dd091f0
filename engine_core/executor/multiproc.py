"""MultiprocExecutor: tensor parallelism over N worker processes (one per device), presented to the
scheduler as one Executor (vLLM v1's MultiprocExecutor shape).

Processes. The parent (LLMEngine, or the executor service's executor thread) holds no model. It
spawns N workers (spawn start method: no CUDA state is forked) and hosts the torch.distributed
rendezvous store. Worker r joins the process group (NCCL with device cuda:r on CUDA, gloo on CPU;
the same code otherwise), builds a LocalExecutor over its shard (`TPGroup(r, N, group, device)`):
its slices of the weights, a KV cache for its KV heads, CUDA graphs of its own. The KV block
count is the minimum over ranks (an all-reduce inside LocalExecutor), so the one block table the
scheduler hands out is valid on every rank; `describe()` checks that and reports the per-rank
geometry (num_kv_heads = KV heads per rank; kv_cache_bytes = all ranks together).

One step. The parent pickles the SchedulerOutput once and writes the same bytes to every worker's
pipe (N small writes; a decode step of 256 requests is a few KB). Every rank applies the same
deltas and runs the same forward; the collectives keep them in lockstep. The LM head all-gathers
the logits to the full vocabulary on every rank, and every rank samples (same bitwise logits, same
seeded generators), so each rank appends the same token to its own request state and the next
step needs no extra message (the alternative, sampling on rank 0 and broadcasting the tokens,
costs one more collective per step). Rank 0 returns the ModelRunnerOutput; the others answer a
short ack, which is what lets the parent tell a consistent error from a lost rank.

Failures. An exception raised on every rank (out of sync, a malformed batch) is raised as is and
the workers stay up. A worker that dies, or an error on some ranks only (the others then wait in a
collective), tears all workers down and raises ExecutorError; the next `reset()` (EngineCore's
replay path) starts a fresh set. Workers poll their parent's pid and exit when it is gone (the
parent was SIGKILLed); `shutdown()` stops them (ask, join, then terminate/kill), as do garbage
collection and interpreter exit.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import threading
import time
import traceback
import weakref
from datetime import timedelta

import torch

from engine_core.config import EngineConfig
from engine_core.distributed import check_tensor_parallel
from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from engine_core.executor.local import model_spec
from engine_core.loader.model_source import resolve_model
from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_METHODS = ("execute", "reset")  # what the parent may call on a worker's LocalExecutor
ERROR_GRACE_S = 5.0  # after one rank fails, how long the others get to answer before a teardown
STOP_TIMEOUT_S = 10.0
PARENT_POLL_S = 0.5
STORE_TIMEOUT = timedelta(minutes=10)  # rendezvous + collectives (loading 70B shards takes a while)


# ---------------------------------------------------------------------------- worker process
def _exit_when_orphaned(parent_pid: int) -> None:
    """The parent died without a shutdown (SIGKILL, OOM killer): exit too, even from inside a
    collective that will never complete."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _error_reply(e: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        return pickle.dumps(("error", e, tb), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
        return pickle.dumps(("error", RuntimeError(f"{type(e).__name__}: {e}"), tb), protocol=pickle.HIGHEST_PROTOCOL)


def _worker_main(rank: int, world_size: int, backend: str, store_port: int, config: EngineConfig,
                 conn: mpc.Connection, parent_pid: int, num_threads: int, log_level: int) -> None:
    _exit_when_orphaned(parent_pid)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [tp{rank}] %(name)s: %(message)s")
    import torch.distributed as dist

    from engine_core.distributed import TPGroup
    from engine_core.executor.local import LocalExecutor

    executor = None
    try:
        torch.set_num_threads(num_threads)
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: loopback
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=STORE_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=STORE_TIMEOUT)
        tp = TPGroup(rank=rank, world_size=world_size, group=dist.group.WORLD, device=device)
        executor = LocalExecutor(dataclasses.replace(config, device=str(device)), tp=tp)
        conn.send_bytes(pickle.dumps(("ok", executor.describe()), protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send_bytes(_error_reply(e))
        return
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):  # the parent closed the pipe or died
                break
            method, args = pickle.loads(data)
            if method == "shutdown":
                break
            try:
                if method not in _METHODS:
                    raise ValueError(f"unknown worker call {method!r}")
                result = getattr(executor, method)(*args)
                reply = pickle.dumps(("ok", result if rank == 0 else None), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                reply = _error_reply(e)
            conn.send_bytes(reply)
    finally:
        executor.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- parent side
def _stop_workers(procs: list, conns: list, timeout: float = STOP_TIMEOUT_S) -> None:
    """Ask every worker to exit, wait, then terminate and kill whatever is left. Idempotent."""
    msg = pickle.dumps(("shutdown", ()))
    for c in conns:
        try:
            c.send_bytes(msg)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for c in conns:
        c.close()
    procs.clear()
    conns.clear()


def _placement(config: EngineConfig, world_size: int) -> tuple[str, list[str]]:
    """(backend, device of each rank). Decided without creating a CUDA context in the parent."""
    dev = str(config.device)
    use_cuda = torch.cuda.is_available() if dev == "auto" else dev.startswith("cuda")
    if not use_cuda:
        return "gloo", ["cpu"] * world_size
    if not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} requested but CUDA is not available")
    n = torch.cuda.device_count()
    if n < world_size:
        raise ValueError(f"tensor_parallel_size {world_size} needs {world_size} GPUs, {n} visible "
                         f"(rank r uses cuda:r; pick GPUs with CUDA_VISIBLE_DEVICES)")
    if dev.startswith("cuda:") and dev != "cuda:0":
        logger.warning("device %s ignored: tensor-parallel rank r uses cuda:r (use CUDA_VISIBLE_DEVICES)", dev)
    return "nccl", [f"cuda:{r}" for r in range(world_size)]


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.source = resolve_model(model_spec(config))
        mc = self.source.config
        check_tensor_parallel(mc, self.world_size)  # a clear ValueError before any process starts
        self.backend, self.devices = _placement(config, self.world_size)
        # the scheduler reads the resolved limits
        config.resolve_limits(mc.max_model_len_limit, "cuda" if self.backend == "nccl" else "cpu")
        self._procs: list = []
        self._conns: list = []
        self._broken: str | None = None
        self._closed = False
        self.rank_infos: list[ExecutorInfo] = []
        self.last_step_bytes = 0  # pickled SchedulerOutput of the last step (sent once per rank)
        # Garbage collection / interpreter exit stop the workers too (holds no reference to self).
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        self._start()

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        import torch.distributed as dist

        ctx = mp.get_context("spawn")
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
        threads = max(1, torch.get_num_threads() // self.world_size) if self.backend == "gloo" else 1
        level = logging.getLogger().getEffectiveLevel()
        t0 = time.perf_counter()
        try:
            for rank in range(self.world_size):
                parent_end, child_end = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_worker_main, name=f"pagedserve-tp{rank}", daemon=True,
                                args=(rank, self.world_size, self.backend, store.port, self.config, child_end,
                                      os.getpid(), threads, level))
                p.start()
                child_end.close()
                self._procs.append(p)
                self._conns.append(parent_end)
            infos = self._call_all(None)
        except BaseException:
            _stop_workers(self._procs, self._conns)
            raise
        finally:
            self._store = store  # kept alive while the workers run (NCCL may re-read it)
        blocks = {i.num_kv_blocks for i in infos}
        if len(blocks) != 1:
            _stop_workers(self._procs, self._conns)
            raise ExecutorError(f"tensor-parallel ranks disagree on the KV block count: {sorted(blocks)}")
        self.rank_infos = infos
        self._broken = None
        logger.info("tensor parallel: %d ranks (%s) ready in %.1fs; %d KV blocks, %d KV heads per rank",
                    self.world_size, self.backend, time.perf_counter() - t0, infos[0].num_kv_blocks,
                    infos[0].num_kv_heads)

    def _teardown(self, reason: str) -> None:
        self._broken = reason
        _stop_workers(self._procs, self._conns, timeout=2.0)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        _stop_workers(self._procs, self._conns)
        self._finalizer.detach()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # ------------------------------------------------------------------ one call on every rank
    def _call_all(self, payload: bytes | None) -> list:
        """Send payload (None: nothing, wait for the start-up reports) to every rank; return every
        rank's result, or raise. See the module docstring for the failure rules."""
        if payload is not None:
            for rank, c in enumerate(self._conns):
                try:
                    c.send_bytes(payload)
                except (OSError, ValueError) as e:
                    self._teardown(f"rank {rank}: pipe closed ({e})")
                    raise ExecutorError(f"tensor-parallel worker {rank} is gone; workers stopped") from e
        n = len(self._conns)
        replies: list = [None] * n
        waitables = {}
        for rank, (p, c) in enumerate(zip(self._procs, self._conns)):
            waitables[c] = rank
            waitables[p.sentinel] = rank
        pending = set(range(n))
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = mpc.wait([w for w, r in waitables.items() if r in pending], timeout)
            if not ready:
                break  # some rank failed and the others are stuck in a collective
            # Replies first: a worker that answered and then exited is not a death.
            for w in sorted(ready, key=lambda w: isinstance(w, int)):
                rank = waitables[w]
                if rank not in pending:
                    continue
                if isinstance(w, int) and self._conns[rank].poll():
                    continue  # its reply is readable: taken on the next round
                try:
                    reply = pickle.loads(self._conns[rank].recv_bytes()) if not isinstance(w, int) else None
                except (EOFError, OSError):
                    reply = None
                if reply is None:
                    self._procs[rank].join(1.0)
                    reply = ("died", ExecutorError(f"worker exited (code {self._procs[rank].exitcode})"), "")
                replies[rank] = reply
                pending.discard(rank)
                if reply[0] != "ok" and deadline is None:
                    deadline = time.monotonic() + ERROR_GRACE_S
        if all(r is not None and r[0] == "ok" for r in replies):
            return [r[1] for r in replies]
        errors = [(rank, r) for rank, r in enumerate(replies) if r is not None and r[0] != "ok"]
        for rank, (_, _, tb) in errors:
            if tb:
                logger.debug("tensor-parallel rank %d failed:\n%s", rank, tb)
        if all(r is not None and r[0] == "error" for r in replies):
            # The same failure on every rank (before or after the same collectives): the ranks are
            # still in step with each other, so the workers stay up.
            raise errors[0][1][1]
        summary = "; ".join(f"rank {rank}: {type(r[1]).__name__}: {r[1]}" for rank, r in errors)
        if pending:
            summary += f"; ranks {sorted(pending)} did not answer"
        self._teardown(summary)
        if payload is None:  # start-up: the first rank's own error says most (bad KV budget, ...)
            first = errors[0][1][1] if errors else ExecutorError(summary)
            raise first if isinstance(first, (ValueError, ExecutorError)) else ExecutorError(summary)
        raise ExecutorError(f"tensor-parallel workers failed ({summary}); they were stopped and "
                            f"reset() starts new ones")

    def _call(self, method: str, *args) -> object:
        if self._closed:
            raise ExecutorError("the executor is shut down")
        if self._broken is not None:
            raise ExecutorError(f"tensor-parallel workers are down ({self._broken}); reset() restarts them")
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)  # once for all ranks
        if method == "execute":
            self.last_step_bytes = len(payload)
        return self._call_all(payload)[0]

    # ------------------------------------------------------------------ Executor
    def describe(self) -> ExecutorInfo:
        info = self.rank_infos[0]
        return dataclasses.replace(info, device=",".join(i.device for i in self.rank_infos),
                                   kv_cache_bytes=sum(i.kv_cache_bytes for i in self.rank_infos))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._call("execute", scheduler_output)

    def reset(self) -> None:
        if self._closed:
            raise ExecutorError("the executor is shut down")
        if self._broken is not None:
            logger.warning("restarting the tensor-parallel workers (%s)", self._broken)
            self._start()
            return
        self._call("reset")
