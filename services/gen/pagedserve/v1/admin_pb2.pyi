# ruff: noqa
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SwapExecutorRequest(_message.Message):
    __slots__ = ("executor_address", "timeout_s")
    EXECUTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    executor_address: str
    timeout_s: float
    def __init__(self, executor_address: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SwapExecutorResponse(_message.Message):
    __slots__ = ("old_executor_address", "new_executor_address", "replayed_requests", "switch_s")
    OLD_EXECUTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEW_EXECUTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SWITCH_S_FIELD_NUMBER: _ClassVar[int]
    old_executor_address: str
    new_executor_address: str
    replayed_requests: int
    switch_s: float
    def __init__(self, old_executor_address: _Optional[str] = ..., new_executor_address: _Optional[str] = ..., replayed_requests: _Optional[int] = ..., switch_s: _Optional[float] = ...) -> None: ...
