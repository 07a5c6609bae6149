from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Principal(_message.Message):
    __slots__ = ("subject", "roles", "device_id", "transport")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    device_id: str
    transport: str
    def __init__(self, subject: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., device_id: _Optional[str] = ..., transport: _Optional[str] = ...) -> None: ...

class ApiRequest(_message.Message):
    __slots__ = ("request_id", "method", "path", "headers", "body", "path_params", "query", "principal")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class PathParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class QueryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    PATH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    method: str
    path: str
    headers: _containers.ScalarMap[str, str]
    body: bytes
    path_params: _containers.ScalarMap[str, str]
    query: _containers.ScalarMap[str, str]
    principal: Principal
    def __init__(self, request_id: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., path_params: _Optional[_Mapping[str, str]] = ..., query: _Optional[_Mapping[str, str]] = ..., principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class ApiResponse(_message.Message):
    __slots__ = ("request_id", "status", "headers", "body")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: int
    headers: _containers.ScalarMap[str, str]
    body: bytes
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ...) -> None: ...

class ApiEvent(_message.Message):
    __slots__ = ("topic", "body")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    topic: str
    body: bytes
    def __init__(self, topic: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("method", "path", "topic", "capability", "public", "request_schema", "response_schema")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    topic: str
    capability: str
    public: bool
    request_schema: str
    response_schema: str
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., topic: _Optional[str] = ..., capability: _Optional[str] = ..., public: _Optional[bool] = ..., request_schema: _Optional[str] = ..., response_schema: _Optional[str] = ...) -> None: ...

class ModuleRegistration(_message.Message):
    __slots__ = ("name", "version", "routes", "admin_routes", "heartbeat_interval_ms", "health_topic")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ROUTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_TOPIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    admin_routes: _containers.RepeatedCompositeFieldContainer[Route]
    heartbeat_interval_ms: int
    health_topic: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., admin_routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., heartbeat_interval_ms: _Optional[int] = ..., health_topic: _Optional[str] = ...) -> None: ...

class ModuleHeartbeat(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
