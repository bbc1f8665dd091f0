from engine_core.executor.base import Executor, ExecutorInfo

__all__ = ["Executor", "ExecutorInfo", "make_executor"]


def make_executor(config) -> Executor:
    """The one place that picks the in-process executor for an EngineConfig: LocalExecutor on one
    device, MultiprocExecutor (one worker process per rank) for tensor_parallel_size > 1."""
    if config.tensor_parallel_size > 1:
        from engine_core.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from engine_core.executor.local import LocalExecutor

    return LocalExecutor(config)
