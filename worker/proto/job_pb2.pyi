from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageJob(_message.Message):
    __slots__ = ("job_id", "model", "model_version", "input_uri", "input_bytes", "output_prefix", "params", "output_format", "deadline", "timeout_s", "priority")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_URI_FIELD_NUMBER: _ClassVar[int]
    INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    model_version: str
    input_uri: str
    input_bytes: bytes
    output_prefix: str
    params: _containers.ScalarMap[str, str]
    output_format: str
    deadline: str
    timeout_s: float
    priority: str
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., input_uri: _Optional[str] = ..., input_bytes: _Optional[bytes] = ..., output_prefix: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., output_format: _Optional[str] = ..., deadline: _Optional[str] = ..., timeout_s: _Optional[float] = ..., priority: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "status", "model", "model_version", "output_uri", "error_code", "error_message", "timings_ms", "finished_at", "message_id", "delivery_attempt", "output_shape", "latency_ms", "traceparent", "fingerprint")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[JobResult.Status]
        SUCCEEDED: _ClassVar[JobResult.Status]
        FAILED: _ClassVar[JobResult.Status]
    STATUS_UNSPECIFIED: JobResult.Status
    SUCCEEDED: JobResult.Status
    FAILED: JobResult.Status
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: JobResult.Status
    model: str
    model_version: str
    output_uri: str
    error_code: str
    error_message: str
    timings_ms: _containers.ScalarMap[str, float]
    finished_at: str
    message_id: str
    delivery_attempt: int
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    latency_ms: float
    traceparent: str
    fingerprint: str
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[JobResult.Status, str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., output_uri: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., finished_at: _Optional[str] = ..., message_id: _Optional[str] = ..., delivery_attempt: _Optional[int] = ..., output_shape: _Optional[_Iterable[int]] = ..., latency_ms: _Optional[float] = ..., traceparent: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...
