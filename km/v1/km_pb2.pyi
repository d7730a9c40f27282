from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("link", "incarnation")
    LINK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    link: str
    incarnation: str
    def __init__(self, link: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("incarnation",)
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    incarnation: str
    def __init__(self, incarnation: _Optional[str] = ...) -> None: ...

class AgreeKeysRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "key_ids")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AgreeKeysReply(_message.Message):
    __slots__ = ("bits",)
    BITS_FIELD_NUMBER: _ClassVar[int]
    bits: int
    def __init__(self, bits: _Optional[int] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("block_id", "offset", "length")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    offset: int
    length: int
    def __init__(self, block_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class DeliveredKey(_message.Message):
    __slots__ = ("key_id", "size_bits")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    size_bits: int
    def __init__(self, key_id: _Optional[str] = ..., size_bits: _Optional[int] = ...) -> None: ...

class DeliverRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "master_sae_id", "slave_sae_ids", "keys", "material")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MASTER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SLAVE_SAE_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MATERIAL_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    master_sae_id: str
    slave_sae_ids: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedCompositeFieldContainer[DeliveredKey]
    material: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., master_sae_id: _Optional[str] = ..., slave_sae_ids: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[_Union[DeliveredKey, _Mapping]]] = ..., material: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class DeliverReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
