"""The OpenAPI 3.1 document of a KM's application API, built from the ETSI 014 models."""

from __future__ import annotations

import functools

from pydantic.json_schema import models_json_schema

from vqkd.km.etsi014 import schema

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _responses(ok: str) -> dict:
    error = {"content": {"application/json": {"schema": _ref("Error")}}}
    return {
        "200": {"description": "OK", "content": {"application/json": {"schema": _ref(ok)}}},
        "400": {"description": "Bad request format", **error},
        "401": {"description": "Unauthorized: the client certificate does not allow this (body may be empty)"},
        "503": {"description": "Error on server side, e.g. not enough key; nothing was consumed", **error},
    }


@functools.cache
def openapi_document() -> dict:
    _, defs = models_json_schema(
        [(m, "validation") for m in (schema.Status, schema.KeyRequest, schema.KeyContainer, schema.KeyIDs, schema.Error)],
        ref_template=REF,
    )
    sae = lambda name, what: {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                              "description": what}
    slave = sae("slave_SAE_ID", "the SAE that will receive the same keys")
    master = sae("master_SAE_ID", "the SAE that obtained the keys with enc_keys")
    count = {"name": "number", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    size = {"name": "size", "in": "query", "schema": {"type": "integer", "minimum": 8},
            "description": "bits, a multiple of 8"}
    key_id = {"name": "key_ID", "in": "query", "required": True, "schema": {"type": "string", "format": "uuid"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vqkd key manager — ETSI GS QKD 014 key delivery",
            "version": "1.1.1",
            "description": "Mutual TLS: the calling SAE is the one named by its client certificate.",
        },
        "paths": {
            "/api/v1/keys/{slave_SAE_ID}/status": {
                "get": {"summary": "Get status", "parameters": [slave], "responses": _responses("Status")},
            },
            "/api/v1/keys/{slave_SAE_ID}/enc_keys": {
                "get": {"summary": "Get key (simple)", "parameters": [slave, count, size],
                        "responses": _responses("KeyContainer")},
                "post": {"summary": "Get key", "parameters": [slave],
                         "requestBody": {"content": {"application/json": {"schema": _ref("KeyRequest")}}},
                         "responses": _responses("KeyContainer")},
            },
            "/api/v1/keys/{master_SAE_ID}/dec_keys": {
                "get": {"summary": "Get key with key ID", "parameters": [master, key_id],
                        "responses": _responses("KeyContainer")},
                "post": {"summary": "Get key with key IDs", "parameters": [master],
                         "requestBody": {"required": True,
                                         "content": {"application/json": {"schema": _ref("KeyIDs")}}},
                         "responses": _responses("KeyContainer")},
            },
        },
        "components": {"schemas": defs["$defs"]},
    }
