from engine_core.executor.base import Executor, ExecutorInfo

__all__ = ["Executor", "ExecutorInfo"]
