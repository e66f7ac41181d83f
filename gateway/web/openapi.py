"""The OpenAPI 3.1 document of the gateway's own API, served at ``/openapi.json``.

Built from the config (only the routes it serves) and the request schemas in
``schemas/``, so it never drifts from what the gateway checks.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..config import LLAMA_SERVER_ROUTES, Config
from ..schemas import SCHEMA_DIR

REQUEST_SCHEMAS = {
    "/v1/chat/completions": ("CreateChatCompletionRequest", "chat.completions.schema.json", "Create a chat completion"),
    "/v1/completions": ("CreateCompletionRequest", "completions.schema.json", "Create a completion"),
    "/v1/embeddings": ("CreateEmbeddingRequest", "embeddings.schema.json", "Create embeddings"),
}
ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
JSON_OBJECT = {"type": "object"}


def _schema(file: str) -> dict[str, Any]:
    schema = json.loads((SCHEMA_DIR / file).read_text())
    schema.pop("$schema", None)
    defs = schema.pop("$defs", {})
    # OpenAPI components hold the definitions; point the references there.
    text = json.dumps(schema)
    for name in defs:
        text = text.replace(f'"#/$defs/{name}"', f'"#/components/schemas/{file.split(".schema")[0]}.{name}"')
    return json.loads(text), {f"{file.split('.schema')[0]}.{name}": d for name, d in defs.items()}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "An error in OpenAI's shape.", "content": {"application/json": {"schema": ERROR}}}
            for status in statuses}


def document(config: Config) -> dict[str, Any]:
    """The OpenAPI document for the routes ``config`` serves."""
    schemas: dict[str, Any] = {
        "ErrorResponse": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
        },
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}}},
    }
    paths: dict[str, Any] = {}
    common_errors = _errors(400, 401, 403, 404, 413, 429, 500, 502, 503, 504)
    for route, (name, file, summary) in REQUEST_SCHEMAS.items():
        if route not in config.routes:
            continue
        schemas[name], defs = _schema(file)
        schemas.update(defs)
        # Only the configured models (and their aliases) are served.
        schemas[name]["properties"]["model"] = {"type": "string", "enum": sorted(config.model_ids)}
        paths[route] = {"post": {
            "summary": summary,
            "operationId": name[0].lower() + name[1:].removesuffix("Request"),
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {
                "200": {"description": "The answer; a stream of server-sent events when `stream` is true.",
                        "content": {"application/json": {"schema": JSON_OBJECT},
                                    "text/event-stream": {"schema": {"type": "string"}}}},
                **common_errors,
            },
        }}
    for route in config.routes:
        if route not in LLAMA_SERVER_ROUTES:
            continue
        paths[route] = {"post": {
            "summary": f"llama-server's {route}, routed by the body's model, answered in llama-server's own shape",
            "operationId": "llamaServer" + "".join(part.capitalize() for part in re.split(r"[/_-]", route)),
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"],
                "properties": {"model": {"type": "string", "enum": sorted(config.model_ids)}}}}}},
            "responses": {
                "200": {"description": "llama-server's answer; a stream of server-sent events when it streams.",
                        "content": {"application/json": {"schema": JSON_OBJECT},
                                    "text/event-stream": {"schema": {"type": "string"}}}},
                **common_errors,
            },
        }}
    if "/v1/models" in config.routes:
        paths["/v1/models"] = {"get": {
            "summary": "List models", "operationId": "listModels",
            "responses": {"200": {"description": "The models.", "content": {"application/json": {"schema": {
                "type": "object", "required": ["object", "data"], "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}}}},
                **_errors(401, 403, 429)}}}
        paths["/v1/models/{model}"] = {"get": {
            "summary": "Retrieve a model", "operationId": "retrieveModel",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The model.",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                          **_errors(401, 403, 404, 429)}}}
    if config.admin_pipeline is not None:
        paths["/admin/status"] = {"get": {
            "summary": "Backends, queues, breakers and pipelines of this worker, and a row per worker of every host (admin key)",
            "operationId": "adminStatus",
            "responses": {"200": {"description": "Status.", "content": {"application/json": {"schema": JSON_OBJECT}}},
                          **_errors(401, 403)}}}
        paths["/v1/requests/{request_id}/cancel"] = {"post": {
            "summary": "Cancel a request in flight (its owner or an admin)", "operationId": "cancelRequest",
            "parameters": [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "Cancelled.", "content": {"application/json": {"schema": JSON_OBJECT}}},
                          **_errors(401, 403, 404)}}}
        paths["/admin/backends/{name}/cancel"] = {"post": {
            "summary": "Cancel every request in flight on a backend (admin key)", "operationId": "cancelBackend",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "Cancelled.", "content": {"application/json": {"schema": JSON_OBJECT}}},
                          **_errors(401, 403, 404)}}}
        paths["/admin/models"] = {"get": {
            "summary": "The fleet's launched models: state, pids, ports, memory, leases, restarts (admin key)",
            "operationId": "adminModels",
            "responses": {"200": {"description": "The fleet.", "content": {"application/json": {"schema": JSON_OBJECT}}},
                          **_errors(401, 403, 503)}}}
        for action, summary in (("load", "Start a launched model and wait until it is ready (admin key)"),
                                ("unload", "Drain a launched model and stop it (admin key)")):
            paths[f"/admin/models/{{model_id}}/{action}"] = {"post": {
                "summary": summary, "operationId": f"{action}Model",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model's state.",
                                      "content": {"application/json": {"schema": JSON_OBJECT}}},
                              **_errors(401, 403, 404, 503)}}}
    paths["/health"] = {"get": {
        "summary": "Readiness of every model's backend", "operationId": "health", "security": [],
        "responses": {"200": {"description": "Every model has a ready backend.",
                              "content": {"application/json": {"schema": JSON_OBJECT}}},
                      "503": {"description": "Some model has none (or the gateway is draining).",
                              "content": {"application/json": {"schema": JSON_OBJECT}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Llamagate", "version": "0.1.0",
                 "description": "An OpenAI-compatible gateway in front of llama.cpp's llama-server."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
