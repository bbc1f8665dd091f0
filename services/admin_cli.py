"""`pagedserve admin ...`: operator commands against a running stack.

    pagedserve admin swap-executor --pid PID
        Ask the `pagedserve serve` launcher with that pid to swap its executor with no downtime
        (SIGUSR1): it starts a new executor process, waits until it is SERVING, has the scheduler
        move every in-flight request onto it by replay (SchedulerAdmin.SwapExecutor), then stops
        the old one. Its log reports the result.
    pagedserve admin swap-executor --scheduler-address S --executor-address E
        Move the scheduler at S onto the executor at E (already started, e.g. by a rollout); prints
        the old address (yours to stop) and how many requests were replayed.

The internal service token comes from $PAGEDSERVE_SERVICE_TOKEN / $PAGEDSERVE_SERVICE_TOKEN_FILE
(`pagedserve serve` prints the file it made), mTLS from --tls-* / $PAGEDSERVE_TLS_*.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

SWAP_SIGNAL = signal.SIGUSR1


def swap_executor(scheduler_address: str, executor_address: str, security, timeout_s: float = 30.0):
    """SchedulerAdmin.SwapExecutor; returns the SwapExecutorResponse (grpc.RpcError on failure)."""
    from services.gen.pagedserve.v1 import admin_pb2, admin_pb2_grpc

    with security.channel(scheduler_address) as ch:
        return admin_pb2_grpc.SchedulerAdminStub(ch).SwapExecutor(
            admin_pb2.SwapExecutorRequest(executor_address=executor_address, timeout_s=timeout_s),
            timeout=timeout_s + 30)


def _cmd_swap(args: argparse.Namespace) -> int:
    if args.pid is not None:
        if args.executor_address or args.scheduler_address:
            print("error: --pid or --scheduler-address/--executor-address, not both", file=sys.stderr)
            return 2
        try:
            os.kill(args.pid, SWAP_SIGNAL)
        except OSError as e:
            print(f"error: cannot signal pid {args.pid}: {e.strerror}", file=sys.stderr)
            return 1
        print(f"asked pagedserve (pid {args.pid}) to swap its executor; its log reports the result")
        return 0
    if not (args.scheduler_address and args.executor_address):
        print("error: give --pid, or both --scheduler-address and --executor-address", file=sys.stderr)
        return 2
    import grpc

    from services.internal_auth import InternalSecurity

    try:
        security = InternalSecurity.from_args(args)
        r = swap_executor(args.scheduler_address, args.executor_address, security, args.timeout)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"error: swap refused: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"swapped {r.old_executor_address} -> {r.new_executor_address}: {r.replayed_requests} requests replayed "
          f"(engine paused {r.switch_s * 1000:.0f} ms); stop the old executor when you like")
    return 0


def add_admin_parser(subparsers) -> argparse.ArgumentParser:
    from services.internal_auth import add_security_args

    p = subparsers.add_parser("admin", help="operator commands against a running stack",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="admin_command", required=True)
    s = sub.add_parser("swap-executor", help="move in-flight requests onto a new executor, no downtime")
    s.add_argument("--pid", type=int, default=None, help="the `pagedserve serve` launcher's pid")
    s.add_argument("--scheduler-address", default=None)
    s.add_argument("--executor-address", default=None, help="the new executor (SERVING, same model and KV size)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the new executor (default 30)")
    add_security_args(s)
    s.set_defaults(func=_cmd_swap)
    return p
