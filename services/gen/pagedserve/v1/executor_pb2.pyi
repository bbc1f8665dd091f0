# ruff: noqa
from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecutorInfo(_message.Message):
    __slots__ = ("model_name", "architecture", "vocab_size", "max_model_len", "num_kv_blocks", "block_size", "dtype", "device", "num_layers", "num_kv_heads", "head_dim", "kv_cache_bytes", "eos_token_ids", "num_speculative_tokens", "num_lookahead_slots")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOOKAHEAD_SLOTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    architecture: str
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_cache_bytes: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_speculative_tokens: int
    num_lookahead_slots: int
    def __init__(self, model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., num_speculative_tokens: _Optional[int] = ..., num_lookahead_slots: _Optional[int] = ...) -> None: ...

class NewRequestData(_message.Message):
    __slots__ = ("req_id", "prompt_token_ids", "sampling_params", "block_ids", "num_computed_tokens", "output_token_ids", "num_scheduled_tokens", "spec_token_ids", "trace_context", "grammar_bitmask")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_BITMASK_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_scheduled_tokens: int
    spec_token_ids: _containers.RepeatedScalarFieldContainer[int]
    trace_context: _containers.ScalarMap[str, str]
    grammar_bitmask: bytes
    def __init__(self, req_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., num_scheduled_tokens: _Optional[int] = ..., spec_token_ids: _Optional[_Iterable[int]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., grammar_bitmask: _Optional[bytes] = ...) -> None: ...

class CachedRequestData(_message.Message):
    __slots__ = ("req_id", "new_block_ids", "num_computed_tokens", "num_scheduled_tokens", "spec_token_ids", "grammar_bitmask", "replaced_block_indices", "replaced_block_ids")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_BITMASK_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    spec_token_ids: _containers.RepeatedScalarFieldContainer[int]
    grammar_bitmask: bytes
    replaced_block_indices: _containers.RepeatedScalarFieldContainer[int]
    replaced_block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, req_id: _Optional[str] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., num_scheduled_tokens: _Optional[int] = ..., spec_token_ids: _Optional[_Iterable[int]] = ..., grammar_bitmask: _Optional[bytes] = ..., replaced_block_indices: _Optional[_Iterable[int]] = ..., replaced_block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class BlockCopy(_message.Message):
    __slots__ = ("src", "dst")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    src: int
    dst: int
    def __init__(self, src: _Optional[int] = ..., dst: _Optional[int] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("step_id", "scheduled_new_reqs", "scheduled_cached_reqs", "schedule_order", "total_num_scheduled_tokens", "finished_req_ids", "block_copies", "bitmasks_deferred", "deferred_bitmasks")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_NEW_REQS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_CACHED_REQS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ORDER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQ_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COPIES_FIELD_NUMBER: _ClassVar[int]
    BITMASKS_DEFERRED_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_BITMASKS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    scheduled_new_reqs: _containers.RepeatedCompositeFieldContainer[NewRequestData]
    scheduled_cached_reqs: _containers.RepeatedCompositeFieldContainer[CachedRequestData]
    schedule_order: _containers.RepeatedScalarFieldContainer[int]
    total_num_scheduled_tokens: int
    finished_req_ids: _containers.RepeatedScalarFieldContainer[str]
    block_copies: _containers.RepeatedCompositeFieldContainer[BlockCopy]
    bitmasks_deferred: bool
    deferred_bitmasks: DeferredBitmasks
    def __init__(self, step_id: _Optional[int] = ..., scheduled_new_reqs: _Optional[_Iterable[_Union[NewRequestData, _Mapping]]] = ..., scheduled_cached_reqs: _Optional[_Iterable[_Union[CachedRequestData, _Mapping]]] = ..., schedule_order: _Optional[_Iterable[int]] = ..., total_num_scheduled_tokens: _Optional[int] = ..., finished_req_ids: _Optional[_Iterable[str]] = ..., block_copies: _Optional[_Iterable[_Union[BlockCopy, _Mapping]]] = ..., bitmasks_deferred: _Optional[bool] = ..., deferred_bitmasks: _Optional[_Union[DeferredBitmasks, _Mapping]] = ...) -> None: ...

class DeferredBitmasks(_message.Message):
    __slots__ = ("req_ids", "bitmasks")
    REQ_IDS_FIELD_NUMBER: _ClassVar[int]
    BITMASKS_FIELD_NUMBER: _ClassVar[int]
    req_ids: _containers.RepeatedScalarFieldContainer[str]
    bitmasks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, req_ids: _Optional[_Iterable[str]] = ..., bitmasks: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TokenLogprobsList(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, entries: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class SampledTokens(_message.Message):
    __slots__ = ("req_id", "token_ids", "logprobs")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: TokenLogprobsList
    def __init__(self, req_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Union[TokenLogprobsList, _Mapping]] = ...) -> None: ...

class SpecTokens(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "outputs", "execute_time_s", "spec_token_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    SPEC_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[SampledTokens]
    execute_time_s: float
    spec_token_ids: _containers.RepeatedCompositeFieldContainer[SpecTokens]
    def __init__(self, step_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[SampledTokens, _Mapping]]] = ..., execute_time_s: _Optional[float] = ..., spec_token_ids: _Optional[_Iterable[_Union[SpecTokens, _Mapping]]] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
