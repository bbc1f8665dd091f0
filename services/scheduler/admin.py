"""pagedserve.v1.SchedulerAdmin on the scheduler's server (protos/pagedserve/v1/admin.proto):
operator RPCs, behind the same service token / mTLS as everything internal."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_core.executor.base import Executor
from services.gen.pagedserve.v1 import admin_pb2, admin_pb2_grpc
from services.internal_auth import InternalSecurity
from services.scheduler.engine_loop import EngineLoop
from services.scheduler.executor_swap import SwapResult

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["SchedulerAdmin"].full_name
DEFAULT_SWAP_TIMEOUT_S = 30.0


class SchedulerAdminServicer(admin_pb2_grpc.SchedulerAdminServicer):
    def __init__(self, engine: EngineLoop, connect: Callable[[str], Executor], security: InternalSecurity) -> None:
        self.engine = engine
        self._connect = connect  # address -> a client of the executor there (GrpcExecutor)
        self._security = security
        self._lock = asyncio.Lock()  # one swap at a time

    async def _wait_serving(self, address: str, timeout_s: float) -> str | None:
        """None once the executor at `address` is SERVING; why not after timeout_s otherwise."""
        from services.executor_client import SERVICE_NAME as EXECUTOR_SERVICE

        deadline = time.monotonic() + timeout_s
        last = "not reachable"
        async with self._security.aio_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE), timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return None
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                except grpc.aio.AioRpcError as e:
                    last = e.code().name
                await asyncio.sleep(0.2)
        return last

    async def SwapExecutor(self, request, context):
        address = request.executor_address.strip()
        if not address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "executor_address is required")
        timeout_s = request.timeout_s if request.timeout_s > 0 else DEFAULT_SWAP_TIMEOUT_S
        async with self._lock:
            why = await self._wait_serving(address, timeout_s)
            if why is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"executor {address} is not SERVING after {timeout_s:g}s ({why})")
            fut = asyncio.get_running_loop().create_future()
            self.engine.swap_executor(lambda: self._connect(address), address, fut)
            result = await fut
        if not isinstance(result, SwapResult):
            await context.abort(result.code, result.message)
        return admin_pb2.SwapExecutorResponse(old_executor_address=result.old_executor,
                                              new_executor_address=result.new_executor,
                                              replayed_requests=result.replayed_requests, switch_s=result.switch_s)
