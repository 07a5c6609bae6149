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

class Endpoint(_message.Message):
    __slots__ = ("transport", "address", "curve_server_key", "subprotocols", "priority", "ca_fingerprint")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CURVE_SERVER_KEY_FIELD_NUMBER: _ClassVar[int]
    SUBPROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transport: str
    address: str
    curve_server_key: str
    subprotocols: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    ca_fingerprint: str
    def __init__(self, transport: _Optional[str] = ..., address: _Optional[str] = ..., curve_server_key: _Optional[str] = ..., subprotocols: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., ca_fingerprint: _Optional[str] = ...) -> None: ...

class TransportInfo(_message.Message):
    __slots__ = ("endpoints", "version")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    version: str
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., version: _Optional[str] = ...) -> None: ...

class SocketFrame(_message.Message):
    __slots__ = ("welcome", "auth", "auth_success", "request", "response", "subscribe", "subscribed", "unsubscribe", "unsubscribed", "event", "heartbeat", "heartbeat_ack", "error", "auth_revoked", "auth_expired", "chunk")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    AUTH_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AUTH_REVOKED_FIELD_NUMBER: _ClassVar[int]
    AUTH_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    auth: Auth
    auth_success: AuthSuccess
    request: ApiRequest
    response: ApiResponse
    subscribe: Topic
    subscribed: Topic
    unsubscribe: Topic
    unsubscribed: Topic
    event: ApiEvent
    heartbeat: Heartbeat
    heartbeat_ack: Heartbeat
    error: SocketError
    auth_revoked: AuthEnded
    auth_expired: AuthEnded
    chunk: ApiResponse
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ..., auth_success: _Optional[_Union[AuthSuccess, _Mapping]] = ..., request: _Optional[_Union[ApiRequest, _Mapping]] = ..., response: _Optional[_Union[ApiResponse, _Mapping]] = ..., subscribe: _Optional[_Union[Topic, _Mapping]] = ..., subscribed: _Optional[_Union[Topic, _Mapping]] = ..., unsubscribe: _Optional[_Union[Topic, _Mapping]] = ..., unsubscribed: _Optional[_Union[Topic, _Mapping]] = ..., event: _Optional[_Union[ApiEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[Heartbeat, _Mapping]] = ..., error: _Optional[_Union[SocketError, _Mapping]] = ..., auth_revoked: _Optional[_Union[AuthEnded, _Mapping]] = ..., auth_expired: _Optional[_Union[AuthEnded, _Mapping]] = ..., chunk: _Optional[_Union[ApiResponse, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "version", "auth_timeout", "idle_timeout", "max_message_size", "authenticated")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    auth_timeout: float
    idle_timeout: float
    max_message_size: int
    authenticated: bool
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., auth_timeout: _Optional[float] = ..., idle_timeout: _Optional[float] = ..., max_message_size: _Optional[int] = ..., authenticated: _Optional[bool] = ...) -> None: ...

class Auth(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class AuthSuccess(_message.Message):
    __slots__ = ("subject", "roles", "session_id", "expires_at")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    session_id: str
    expires_at: float
    def __init__(self, subject: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., session_id: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class Topic(_message.Message):
    __slots__ = ("topic", "id", "reason")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    topic: str
    id: str
    reason: str
    def __init__(self, topic: _Optional[str] = ..., id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SocketError(_message.Message):
    __slots__ = ("id", "problem")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    id: str
    problem: bytes
    def __init__(self, id: _Optional[str] = ..., problem: _Optional[bytes] = ...) -> None: ...

class AuthEnded(_message.Message):
    __slots__ = ("problem",)
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    problem: bytes
    def __init__(self, problem: _Optional[bytes] = ...) -> None: ...
