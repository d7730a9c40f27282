"""ETSI GS QKD 014 V1.1.1 data formats, field for field.

These models are the one description of the wire format: requests are validated with
them, responses follow their field names, and the OpenAPI document is generated from
them. ``extra="allow"`` keeps unknown members that the standard leaves to vendors from
being rejected; the mandatory-extension rule is enforced by the server, not here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")


class Status(_Message):
    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int = Field(description="default key size, bits")
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int = Field(description="bits")
    min_key_size: int = Field(description="bits")
    max_SAE_ID_count: int = Field(description="0 when additional slave SAEs are not supported")
    status_extension: dict[str, Any] | None = None


class KeyRequest(_Message):
    number: int | None = Field(default=None, description="number of keys, default 1")
    size: int | None = Field(default=None, description="key size in bits, default key_size")
    additional_slave_SAE_IDs: list[str] | None = None
    extension_mandatory: list[dict[str, Any]] | None = None
    extension_optional: list[dict[str, Any]] | None = None


class Key(_Message):
    key_ID: str
    key: str = Field(description="standard base64 with padding")
    key_ID_extension: dict[str, Any] | None = None
    key_extension: dict[str, Any] | None = None


class KeyContainer(_Message):
    keys: list[Key]
    key_container_extension: dict[str, Any] | None = None


class KeyIDRef(_Message):
    key_ID: str
    key_ID_extension: dict[str, Any] | None = None


class KeyIDs(_Message):
    key_IDs: list[KeyIDRef]
    key_IDs_extension: dict[str, Any] | None = None


class Error(_Message):
    message: str
    details: list[dict[str, Any]] | None = None


# Fixed messages of GS QKD 014 §6 for HTTP 400.
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MSG_MANDATORY_UNMET = "not all extension_mandatory request options could be met"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
