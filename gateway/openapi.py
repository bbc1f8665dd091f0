"""The published /openapi.json with the request schemas of the two POST routes (issue 16, finding 7).

The handlers read the body themselves (`Model.model_validate_json`: one parse, strict types, errors
in OpenAI's shape), so FastAPI cannot infer a schema from their signatures. This adds the pydantic
models' JSON schemas as the routes' request bodies (and the 200 answers), so schema-driven tools
(SDK generators, schemathesis) see the real contract.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

REF = "#/components/schemas/{model}"
ROUTES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "/v1/completions": (CompletionRequest, CompletionResponse),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
# `prompt` is typed Any in the model (its validator checks the shape); this is that shape.
PROMPT_SCHEMA = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, _TOKEN_IDS,
              {"type": "array", "items": _TOKEN_IDS, "minItems": 1}],
    "title": "Prompt",
}
_ERROR = {"description": "Error (OpenAI's shape)", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "integer", "null"]}}}}}}}}


def _add_model(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for path, (request_model, response_model) in ROUTES.items():
            op = spec.get("paths", {}).get(path, {}).get("post")
            if op is None:
                continue
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": _add_model(components, request_model)}}}
            op["responses"] = {
                "200": {"description": "The completion (a JSON object, or text/event-stream when stream is true)",
                        "content": {"application/json": {"schema": _add_model(components, response_model)},
                                    "text/event-stream": {"schema": {"type": "string"}}}},
                **{str(code): _ERROR for code in (400, 401, 404, 413, 429, 503, 504)},
            }
        components["CompletionRequest"]["properties"]["prompt"] = PROMPT_SCHEMA
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
