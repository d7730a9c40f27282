from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    SOURCE: _ClassVar[Role]
    INTERMEDIATE: _ClassVar[Role]
    DESTINATION: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
SOURCE: Role
INTERMEDIATE: Role
DESTINATION: Role

class HelloRequest(_message.Message):
    __slots__ = ("link", "incarnation", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    incarnation: str
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., incarnation: _Optional[str] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("incarnation",)
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    incarnation: str
    def __init__(self, incarnation: _Optional[str] = ...) -> None: ...

class AgreeKeysRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "key_ids", "abandoned_key_ids", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    abandoned_key_ids: _containers.RepeatedScalarFieldContainer[str]
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., key_ids: _Optional[_Iterable[str]] = ..., abandoned_key_ids: _Optional[_Iterable[str]] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class AgreeKeysReply(_message.Message):
    __slots__ = ("bits", "held_key_ids", "waiting_reason", "waiting_message", "seconds_per_key")
    BITS_FIELD_NUMBER: _ClassVar[int]
    HELD_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    WAITING_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_KEY_FIELD_NUMBER: _ClassVar[int]
    bits: int
    held_key_ids: _containers.RepeatedScalarFieldContainer[str]
    waiting_reason: str
    waiting_message: str
    seconds_per_key: float
    def __init__(self, bits: _Optional[int] = ..., held_key_ids: _Optional[_Iterable[str]] = ..., waiting_reason: _Optional[str] = ..., waiting_message: _Optional[str] = ..., seconds_per_key: _Optional[float] = ...) -> None: ...

class DeviceStatusRequest(_message.Message):
    __slots__ = ("link", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class DeviceEnd(_message.Message):
    __slots__ = ("known", "key_size", "min_key_size", "max_key_size", "max_key_per_request", "seconds_per_key", "state", "reason", "message")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    known: bool
    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    seconds_per_key: float
    state: str
    reason: str
    message: str
    def __init__(self, known: _Optional[bool] = ..., key_size: _Optional[int] = ..., min_key_size: _Optional[int] = ..., max_key_size: _Optional[int] = ..., max_key_per_request: _Optional[int] = ..., seconds_per_key: _Optional[float] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("block_id", "offset", "length")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    offset: int
    length: int
    def __init__(self, block_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("master_sae_id", "slave_sae_ids", "key_ids", "size_bits", "material")
    MASTER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SLAVE_SAE_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BITS_FIELD_NUMBER: _ClassVar[int]
    MATERIAL_FIELD_NUMBER: _ClassVar[int]
    master_sae_id: str
    slave_sae_ids: _containers.RepeatedScalarFieldContainer[str]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    size_bits: int
    material: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, master_sae_id: _Optional[str] = ..., slave_sae_ids: _Optional[_Iterable[str]] = ..., key_ids: _Optional[_Iterable[str]] = ..., size_bits: _Optional[int] = ..., material: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class DeliverRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "deliveries", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    deliveries: _containers.RepeatedCompositeFieldContainer[Delivery]
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., deliveries: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class DeliverReply(_message.Message):
    __slots__ = ("refused",)
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, refused: _Optional[_Iterable[str]] = ...) -> None: ...

class RelayRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "session_id", "relay_id", "index", "master_sae_id", "slave_sae_ids", "key_ids", "key_size_bits", "direct", "ciphertext", "pad", "mac_key", "tag", "key_extension", "stream")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MASTER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SLAVE_SAE_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_BITS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    KEY_EXTENSION_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    session_id: str
    relay_id: str
    index: int
    master_sae_id: str
    slave_sae_ids: _containers.RepeatedScalarFieldContainer[str]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    key_size_bits: int
    direct: bool
    ciphertext: bytes
    pad: _containers.RepeatedCompositeFieldContainer[Span]
    mac_key: _containers.RepeatedCompositeFieldContainer[Span]
    tag: bytes
    key_extension: str
    stream: bool
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., session_id: _Optional[str] = ..., relay_id: _Optional[str] = ..., index: _Optional[int] = ..., master_sae_id: _Optional[str] = ..., slave_sae_ids: _Optional[_Iterable[str]] = ..., key_ids: _Optional[_Iterable[str]] = ..., key_size_bits: _Optional[int] = ..., direct: _Optional[bool] = ..., ciphertext: _Optional[bytes] = ..., pad: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., mac_key: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., tag: _Optional[bytes] = ..., key_extension: _Optional[str] = ..., stream: _Optional[bool] = ...) -> None: ...

class RelayBatch(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "relays", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    relays: _containers.RepeatedCompositeFieldContainer[RelayRequest]
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., relays: _Optional[_Iterable[_Union[RelayRequest, _Mapping]]] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class RelayBatchReply(_message.Message):
    __slots__ = ("refused",)
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, refused: _Optional[_Iterable[str]] = ...) -> None: ...

class HybridRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "session_id", "relay_id", "index", "master_sae_id", "slave_sae_ids", "key_ids", "key_size_bits", "stream", "offer", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MASTER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SLAVE_SAE_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_BITS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    session_id: str
    relay_id: str
    index: int
    master_sae_id: str
    slave_sae_ids: _containers.RepeatedScalarFieldContainer[str]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    key_size_bits: int
    stream: bool
    offer: bytes
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., session_id: _Optional[str] = ..., relay_id: _Optional[str] = ..., index: _Optional[int] = ..., master_sae_id: _Optional[str] = ..., slave_sae_ids: _Optional[_Iterable[str]] = ..., key_ids: _Optional[_Iterable[str]] = ..., key_size_bits: _Optional[int] = ..., stream: _Optional[bool] = ..., offer: _Optional[bytes] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class HybridReply(_message.Message):
    __slots__ = ("reply",)
    REPLY_FIELD_NUMBER: _ClassVar[int]
    reply: bytes
    def __init__(self, reply: _Optional[bytes] = ...) -> None: ...

class RelayCommit(_message.Message):
    __slots__ = ("session_id", "relay_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    relay_id: str
    def __init__(self, session_id: _Optional[str] = ..., relay_id: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("link", "sender_incarnation", "receiver_incarnation", "commits", "sender_replica")
    LINK_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    sender_incarnation: str
    receiver_incarnation: str
    commits: _containers.RepeatedCompositeFieldContainer[RelayCommit]
    sender_replica: int
    def __init__(self, link: _Optional[str] = ..., sender_incarnation: _Optional[str] = ..., receiver_incarnation: _Optional[str] = ..., commits: _Optional[_Iterable[_Union[RelayCommit, _Mapping]]] = ..., sender_replica: _Optional[int] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("refused",)
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, refused: _Optional[_Iterable[str]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("node", "sae_id")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    node: str
    sae_id: str
    def __init__(self, node: _Optional[str] = ..., sae_id: _Optional[str] = ...) -> None: ...

class TopologyConfig(_message.Message):
    __slots__ = ("version", "node", "saes", "links", "limits", "replicas")
    class SaesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SAES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    version: int
    node: str
    saes: _containers.ScalarMap[str, str]
    links: _containers.RepeatedCompositeFieldContainer[LinkEnd]
    limits: KeyLimits
    replicas: _containers.ScalarMap[int, str]
    def __init__(self, version: _Optional[int] = ..., node: _Optional[str] = ..., saes: _Optional[_Mapping[str, str]] = ..., links: _Optional[_Iterable[_Union[LinkEnd, _Mapping]]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., replicas: _Optional[_Mapping[int, str]] = ...) -> None: ...

class LinkEnd(_message.Message):
    __slots__ = ("name", "peer_node", "peer_kme_id", "peer_grpc", "module_url", "module_sae_id", "peer_module_sae_id", "module_tls", "block_bits", "pool_target_bits", "peer_replica")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_NODE_FIELD_NUMBER: _ClassVar[int]
    PEER_KME_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_GRPC_FIELD_NUMBER: _ClassVar[int]
    MODULE_URL_FIELD_NUMBER: _ClassVar[int]
    MODULE_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_MODULE_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_TLS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BITS_FIELD_NUMBER: _ClassVar[int]
    POOL_TARGET_BITS_FIELD_NUMBER: _ClassVar[int]
    PEER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    name: str
    peer_node: str
    peer_kme_id: str
    peer_grpc: str
    module_url: str
    module_sae_id: str
    peer_module_sae_id: str
    module_tls: TLSPaths
    block_bits: int
    pool_target_bits: int
    peer_replica: int
    def __init__(self, name: _Optional[str] = ..., peer_node: _Optional[str] = ..., peer_kme_id: _Optional[str] = ..., peer_grpc: _Optional[str] = ..., module_url: _Optional[str] = ..., module_sae_id: _Optional[str] = ..., peer_module_sae_id: _Optional[str] = ..., module_tls: _Optional[_Union[TLSPaths, _Mapping]] = ..., block_bits: _Optional[int] = ..., pool_target_bits: _Optional[int] = ..., peer_replica: _Optional[int] = ...) -> None: ...

class TLSPaths(_message.Message):
    __slots__ = ("ca", "cert", "key")
    CA_FIELD_NUMBER: _ClassVar[int]
    CERT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ca: str
    cert: str
    key: str
    def __init__(self, ca: _Optional[str] = ..., cert: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class KeyLimits(_message.Message):
    __slots__ = ("key_size", "min_key_size", "max_key_size", "max_key_per_request")
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    def __init__(self, key_size: _Optional[int] = ..., min_key_size: _Optional[int] = ..., max_key_size: _Optional[int] = ..., max_key_per_request: _Optional[int] = ...) -> None: ...

class ConfigureTopologyReply(_message.Message):
    __slots__ = ("version", "incarnation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    incarnation: str
    def __init__(self, version: _Optional[int] = ..., incarnation: _Optional[str] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("session_id", "version", "role", "user", "source", "destination", "prev_hop", "next_hop", "priority", "rate_bps", "bucket_bits", "inactivity_timeout_ms", "request_timeout_ms", "key_chunk_size", "ttl_s", "fallback")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PREV_HOP_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RATE_BPS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BITS_FIELD_NUMBER: _ClassVar[int]
    INACTIVITY_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    role: Role
    user: str
    source: Endpoint
    destination: Endpoint
    prev_hop: str
    next_hop: str
    priority: int
    rate_bps: float
    bucket_bits: int
    inactivity_timeout_ms: int
    request_timeout_ms: int
    key_chunk_size: int
    ttl_s: int
    fallback: str
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., role: _Optional[_Union[Role, str]] = ..., user: _Optional[str] = ..., source: _Optional[_Union[Endpoint, _Mapping]] = ..., destination: _Optional[_Union[Endpoint, _Mapping]] = ..., prev_hop: _Optional[str] = ..., next_hop: _Optional[str] = ..., priority: _Optional[int] = ..., rate_bps: _Optional[float] = ..., bucket_bits: _Optional[int] = ..., inactivity_timeout_ms: _Optional[int] = ..., request_timeout_ms: _Optional[int] = ..., key_chunk_size: _Optional[int] = ..., ttl_s: _Optional[int] = ..., fallback: _Optional[str] = ...) -> None: ...

class ConfigureSessionReply(_message.Message):
    __slots__ = ("state", "version")
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    state: str
    version: int
    def __init__(self, state: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteSessionReply(_message.Message):
    __slots__ = ("existed", "keys_delivered")
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    KEYS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    keys_delivered: int
    def __init__(self, existed: _Optional[bool] = ..., keys_delivered: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("config", "state", "keys_delivered", "bits_delivered", "refused_by_bucket", "last_activity_age_s")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KEYS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    BITS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_BY_BUCKET_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_AGE_S_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    state: str
    keys_delivered: int
    bits_delivered: int
    refused_by_bucket: int
    last_activity_age_s: float
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., state: _Optional[str] = ..., keys_delivered: _Optional[int] = ..., bits_delivered: _Optional[int] = ..., refused_by_bucket: _Optional[int] = ..., last_activity_age_s: _Optional[float] = ...) -> None: ...

class ListSessionsReply(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("link", "peer_node", "outgoing_bits", "incoming_bits", "drawn_bits_total", "relayed_bits_total", "state", "reason", "message", "module_drawn_bits_total", "burned_bits_total", "block_bits", "incarnation", "pool_full", "peer_replica")
    class BurnedBitsTotalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LINK_FIELD_NUMBER: _ClassVar[int]
    PEER_NODE_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_BITS_FIELD_NUMBER: _ClassVar[int]
    INCOMING_BITS_FIELD_NUMBER: _ClassVar[int]
    DRAWN_BITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RELAYED_BITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODULE_DRAWN_BITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BURNED_BITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BITS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    POOL_FULL_FIELD_NUMBER: _ClassVar[int]
    PEER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    link: str
    peer_node: str
    outgoing_bits: int
    incoming_bits: int
    drawn_bits_total: int
    relayed_bits_total: int
    state: str
    reason: str
    message: str
    module_drawn_bits_total: int
    burned_bits_total: _containers.ScalarMap[str, int]
    block_bits: int
    incarnation: str
    pool_full: bool
    peer_replica: int
    def __init__(self, link: _Optional[str] = ..., peer_node: _Optional[str] = ..., outgoing_bits: _Optional[int] = ..., incoming_bits: _Optional[int] = ..., drawn_bits_total: _Optional[int] = ..., relayed_bits_total: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., module_drawn_bits_total: _Optional[int] = ..., burned_bits_total: _Optional[_Mapping[str, int]] = ..., block_bits: _Optional[int] = ..., incarnation: _Optional[str] = ..., pool_full: _Optional[bool] = ..., peer_replica: _Optional[int] = ...) -> None: ...

class SessionDelivered(_message.Message):
    __slots__ = ("session_id", "keys", "bits")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keys: int
    bits: int
    def __init__(self, session_id: _Optional[str] = ..., keys: _Optional[int] = ..., bits: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("node", "incarnation", "links", "sessions", "keys_delivered_total", "delivered", "topology_version", "replica")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KEYS_DELIVERED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: str
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    sessions: int
    keys_delivered_total: int
    delivered: _containers.RepeatedCompositeFieldContainer[SessionDelivered]
    topology_version: int
    replica: int
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[str] = ..., links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., sessions: _Optional[int] = ..., keys_delivered_total: _Optional[int] = ..., delivered: _Optional[_Iterable[_Union[SessionDelivered, _Mapping]]] = ..., topology_version: _Optional[int] = ..., replica: _Optional[int] = ...) -> None: ...

class QoS(_message.Message):
    __slots__ = ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout_ms", "ttl_s", "fallback")
    KEY_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BPS_FIELD_NUMBER: _ClassVar[int]
    MIN_BPS_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    key_chunk_size: int
    max_bps: float
    min_bps: float
    jitter: float
    priority: int
    timeout_ms: int
    ttl_s: int
    fallback: str
    def __init__(self, key_chunk_size: _Optional[int] = ..., max_bps: _Optional[float] = ..., min_bps: _Optional[float] = ..., jitter: _Optional[float] = ..., priority: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., ttl_s: _Optional[int] = ..., fallback: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("node", "caller_sae_id", "source", "destination", "qos", "session_id", "implicit", "replica")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CALLER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IMPLICIT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    node: str
    caller_sae_id: str
    source: Endpoint
    destination: Endpoint
    qos: QoS
    session_id: str
    implicit: bool
    replica: int
    def __init__(self, node: _Optional[str] = ..., caller_sae_id: _Optional[str] = ..., source: _Optional[_Union[Endpoint, _Mapping]] = ..., destination: _Optional[_Union[Endpoint, _Mapping]] = ..., qos: _Optional[_Union[QoS, _Mapping]] = ..., session_id: _Optional[str] = ..., implicit: _Optional[bool] = ..., replica: _Optional[int] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("accepted", "session_id", "reason", "qos", "peer_registered", "etsi004_status", "unauthorized")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    PEER_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ETSI004_STATUS_FIELD_NUMBER: _ClassVar[int]
    UNAUTHORIZED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    session_id: str
    reason: str
    qos: QoS
    peer_registered: bool
    etsi004_status: int
    unauthorized: bool
    def __init__(self, accepted: _Optional[bool] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ..., qos: _Optional[_Union[QoS, _Mapping]] = ..., peer_registered: _Optional[bool] = ..., etsi004_status: _Optional[int] = ..., unauthorized: _Optional[bool] = ...) -> None: ...

class SessionSignal(_message.Message):
    __slots__ = ("node", "session_id", "reason", "requests", "replica")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    node: str
    session_id: str
    reason: str
    requests: int
    replica: int
    def __init__(self, node: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ..., requests: _Optional[int] = ..., replica: _Optional[int] = ...) -> None: ...

class SignalReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IncarnationRequest(_message.Message):
    __slots__ = ("sender_replica",)
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    def __init__(self, sender_replica: _Optional[int] = ...) -> None: ...

class IncarnationReply(_message.Message):
    __slots__ = ("replica", "incarnation")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    replica: int
    incarnation: str
    def __init__(self, replica: _Optional[int] = ..., incarnation: _Optional[str] = ...) -> None: ...

class HeldKeys(_message.Message):
    __slots__ = ("master_sae_id", "slave_sae_ids", "key_ids", "keys", "key_extension", "ttl_s")
    MASTER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SLAVE_SAE_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_EXTENSION_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    master_sae_id: str
    slave_sae_ids: _containers.RepeatedScalarFieldContainer[str]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    key_extension: str
    ttl_s: float
    def __init__(self, master_sae_id: _Optional[str] = ..., slave_sae_ids: _Optional[_Iterable[str]] = ..., key_ids: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[bytes]] = ..., key_extension: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class HoldCopiesRequest(_message.Message):
    __slots__ = ("sender_replica", "sender_incarnation", "held")
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    sender_incarnation: str
    held: _containers.RepeatedCompositeFieldContainer[HeldKeys]
    def __init__(self, sender_replica: _Optional[int] = ..., sender_incarnation: _Optional[str] = ..., held: _Optional[_Iterable[_Union[HeldKeys, _Mapping]]] = ...) -> None: ...

class HoldCopiesReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DropCopiesRequest(_message.Message):
    __slots__ = ("sender_replica", "key_ids")
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sender_replica: _Optional[int] = ..., key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DropCopiesReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TakeKeysRequest(_message.Message):
    __slots__ = ("sender_replica", "sender_incarnation", "caller_sae_id", "master_sae_id", "key_ids")
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CALLER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    MASTER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    sender_incarnation: str
    caller_sae_id: str
    master_sae_id: str
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sender_replica: _Optional[int] = ..., sender_incarnation: _Optional[str] = ..., caller_sae_id: _Optional[str] = ..., master_sae_id: _Optional[str] = ..., key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TakeKeysReply(_message.Message):
    __slots__ = ("held", "not_a_slave", "undecided")
    HELD_FIELD_NUMBER: _ClassVar[int]
    NOT_A_SLAVE_FIELD_NUMBER: _ClassVar[int]
    UNDECIDED_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedCompositeFieldContainer[HeldKeys]
    not_a_slave: bool
    undecided: bool
    def __init__(self, held: _Optional[_Iterable[_Union[HeldKeys, _Mapping]]] = ..., not_a_slave: _Optional[bool] = ..., undecided: _Optional[bool] = ...) -> None: ...

class ForwardGetKeyRequest(_message.Message):
    __slots__ = ("sender_replica", "caller_sae_id", "key_stream_id", "has_index", "index", "metadata_size")
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    CALLER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    METADATA_SIZE_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    caller_sae_id: str
    key_stream_id: str
    has_index: bool
    index: int
    metadata_size: int
    def __init__(self, sender_replica: _Optional[int] = ..., caller_sae_id: _Optional[str] = ..., key_stream_id: _Optional[str] = ..., has_index: _Optional[bool] = ..., index: _Optional[int] = ..., metadata_size: _Optional[int] = ...) -> None: ...

class ForwardGetKeyReply(_message.Message):
    __slots__ = ("status", "index", "key", "key_id", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: int
    index: int
    key: bytes
    key_id: str
    message: str
    def __init__(self, status: _Optional[int] = ..., index: _Optional[int] = ..., key: _Optional[bytes] = ..., key_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardCloseRequest(_message.Message):
    __slots__ = ("sender_replica", "caller_sae_id", "key_stream_id")
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    CALLER_SAE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    caller_sae_id: str
    key_stream_id: str
    def __init__(self, sender_replica: _Optional[int] = ..., caller_sae_id: _Optional[str] = ..., key_stream_id: _Optional[str] = ...) -> None: ...

class ForwardCloseReply(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: int
    def __init__(self, status: _Optional[int] = ...) -> None: ...

class HandChunksRequest(_message.Message):
    __slots__ = ("sender_replica", "session_id", "index", "key_ids", "keys")
    SENDER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    sender_replica: int
    session_id: str
    index: int
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, sender_replica: _Optional[int] = ..., session_id: _Optional[str] = ..., index: _Optional[int] = ..., key_ids: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HandChunksReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
