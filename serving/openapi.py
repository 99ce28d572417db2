"""The OpenAPI description of the NIM routes, served at /v1/openapi.json and merged into BentoML's /docs.json.

BentoML documents only its own `@bentoml.api` methods: the mounted Starlette app (every /v1 route) is invisible to
its generator. This document is written by hand from the API contract, so that clients, Swagger UI (`/`) and
fuzzers (tests/test_hardening_fuzz.py runs schemathesis against /docs.json) all see the routes that matter.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from serving.errors import ERRORS_BY_STATUS
from serving.schemas import ENCODING_FORMATS, INPUT_TYPES, MODALITIES, TRUNCATE_MODES

EMBEDDING_TYPES = ["float", "binary", "ubinary", "int8", "uint8"]
PATH = "/v1/openapi.json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json(_ref("Error"), ERRORS_BY_STATUS[s].type) for s in statuses}


def _get(summary: str, schema: dict[str, Any] | None, *errors: int, media: str = "application/json") -> dict:
    ok = _json(schema, "OK") if media == "application/json" else {
        "description": "OK", "content": {media: {"schema": {"type": "string"}}}}
    return {"get": {"summary": summary, "tags": ["NIM"], "responses": {"200": ok, **_errors(*errors)}}}


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["object", "message", "type"], "properties": {
        "object": {"type": "string", "enum": ["error"]}, "message": {"type": "string"}, "type": {"type": "string"}}},
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "description": "the served model id, optionally with -query or -passage",
                      "example": "nvidia/llama-nemotron-embed-vl-1b-v2"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                      "description": "text, an image data URL (data:image/png;base64,...) or text with one image"},
            "input_type": {"type": "string", "enum": list(INPUT_TYPES)},
            "modality": {"oneOf": [{"type": "string", "enum": list(MODALITIES)},
                                   {"type": "array", "items": {"type": "string", "enum": list(MODALITIES)},
                                    "minItems": 1}]},
            "embedding_type": {"type": "string", "enum": EMBEDDING_TYPES, "default": "float"},
            "encoding_format": {"type": "string", "enum": list(ENCODING_FORMATS), "default": "float"},
            "dimensions": {"type": "integer", "description": "Matryoshka size (float only)"},
            "truncate": {"type": "string", "enum": list(TRUNCATE_MODES), "default": "NONE"},
            "user": {"type": "string"},
        }},
    "EmbeddingList": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {
            "object": {"type": "string", "enum": ["embedding"]}, "index": {"type": "integer"},
            "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
        "model": {"type": "string"},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "total_tokens": {"type": "integer"}}}}},
    "Health": {"type": "object", "required": ["object", "message"], "properties": {
        "object": {"type": "string"}, "message": {"type": "string"}, "ready": {"type": "boolean"},
        "live": {"type": "boolean"}}},
    "Object": {"type": "object"},
}


def document(auth: bool = False) -> dict[str, Any]:
    """OpenAPI 3.0 for the /v1 routes; with `auth`, they ask for a Bearer key (health and metrics stay open)."""
    paths: dict[str, Any] = {
        "/v1/embeddings": {"post": {
            "summary": "Embed text, images or both", "tags": ["NIM"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("EmbeddingRequest")}}},
            "responses": {"200": _json(_ref("EmbeddingList"), "Embeddings, in input order"),
                          **_errors(400, 401, 404, 413, 429, 500, 503, 504)}}},
        "/v1/models": _get("The served model", _ref("Object"), 401),
        "/v1/health/ready": _get("200 once the model is loaded and compiled", _ref("Health"), 503),
        "/v1/health/live": _get("200 while the process serves", _ref("Health"), 503),
        "/v1/metrics": _get("Prometheus metrics", None, media="text/plain"),
        "/v1/metadata": _get("Runtime, model, limits and capabilities", _ref("Object"), 401),
        "/v1/manifest": _get("What is served: source, hashes, dtype", _ref("Object"), 401, 503),
        "/v1/license": _get("Licenses of the weights and of this software", _ref("Object"), 401),
        "/v1/version": _get("Release and API version", _ref("Object"), 401),
        PATH: _get("This document", _ref("Object"), 401),
    }
    doc: dict[str, Any] = {
        "openapi": "3.0.2",
        "info": {"title": "NVIDIA NIM embedding API (llama-nemotron-embed-vl-1b-v2)", "version": "v1"},
        "paths": paths, "components": {"schemas": SCHEMAS},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        for path, item in paths.items():
            if path not in ("/v1/health/ready", "/v1/health/live", "/v1/metrics"):
                for operation in item.values():
                    operation["security"] = [{"bearerAuth": []}]
    return doc


def merge(bentoml_doc: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """BentoML's document with our paths and schemas added (ours win on a name clash: they are the contract)."""
    merged = dict(bentoml_doc)
    merged["paths"] = {**bentoml_doc.get("paths", {}), **ours["paths"]}
    components = dict(bentoml_doc.get("components") or {})
    for key, values in ours["components"].items():
        components[key] = {**(components.get(key) or {}), **values}
    merged["components"] = components
    return merged


class MergeIntoBentoDocs:
    """ASGI middleware: GET /docs.json (BentoML's OpenAPI) answers with the NIM routes merged in."""

    def __init__(self, app: Any, document: dict[str, Any]) -> None:
        self.app, self.document = app, document

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") != "/docs.json" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def hold(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, hold)
        assert start is not None
        body = b"".join(chunks)
        if start["status"] == 200:
            body = json.dumps(merge(json.loads(body), self.document)).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
