"""ETSI GS QKD 004 V2.1.1 calls as JSON over the KM's HTTPS API.

The standard defines the calls' parameters, not a wire format; vqkd carries them as JSON
objects whose member names are the standard's parameter names.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QoSParameters(_Message):
    Key_chunk_size: int = Field(0, ge=0, le=1024, description="bytes per GET_KEY; 0 lets the network choose")
    Max_bps: float = Field(0, ge=0)
    Min_bps: float = Field(0, ge=0)
    Jitter: float = Field(0, ge=0)
    Priority: int = Field(0, ge=0, le=255)
    Timeout: int = Field(0, ge=0, le=600_000, description="ms")
    TTL: int = Field(0, ge=0, description="s")
    Metadata_mimetype: str = "application/json"
    vqkd_fallback: str = Field("", pattern="^(|none|pqc)$",
                               description="vqkd extension: 'pqc' allows hybrid ML-KEM-768 + X25519 keys")


class OpenConnect(_Message):
    source: str
    destination: str
    QoS: QoSParameters = QoSParameters()
    Key_stream_ID: str = ""


class GetKey(_Message):
    Key_stream_ID: str
    index: int | None = Field(None, ge=0, lt=2**32)
    Metadata_size: int = Field(0, ge=0)


class Close(_Message):
    Key_stream_ID: str
