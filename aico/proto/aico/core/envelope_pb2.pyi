import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageMetadata(_message.Message):
    __slots__ = ("message_id", "timestamp", "source", "message_type", "version", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    timestamp: _timestamp_pb2.Timestamp
    source: str
    message_type: str
    version: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, message_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., message_type: _Optional[str] = ..., version: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AicoMessage(_message.Message):
    __slots__ = ("metadata", "any_payload")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ANY_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    metadata: MessageMetadata
    any_payload: _any_pb2.Any
    def __init__(self, metadata: _Optional[_Union[MessageMetadata, _Mapping]] = ..., any_payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...
