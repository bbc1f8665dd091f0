"""The executor gRPC service: any engine_core Executor behind pagedserve.v1.Executor."""
