"""OpenAI `response_format` and vLLM's structured-output extras -> StructuredOutputsParams.

Accepted (one per request): `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}; `structured_outputs` {json | regex | choice |
grammar | json_object | structural_tag} (vLLM >= 0.10); and the older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` top-level extras. Shape errors are 400s here; a
schema, regex or grammar the compiler rejects is a 400 from the scheduler (INVALID_ARGUMENT),
still before any compute.
"""
from __future__ import annotations

from typing import Any

from engine_core.structured_output.params import StructuredOutputsParams
from gateway.errors import bad_request
from gateway.protocol import SamplingFields

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(req: SamplingFields) -> StructuredOutputsParams | None:
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        found.append(("response_format", _from_response_format(rf.type, rf.model_extra or {})))
    if req.structured_outputs is not None:
        try:
            found.append(("structured_outputs", StructuredOutputsParams.from_dict(req.structured_outputs)))
        except (ValueError, TypeError) as e:
            raise bad_request(f"structured_outputs: {e}", param="structured_outputs") from None
    for field, kind in _GUIDED.items():
        v = getattr(req, field)
        if v is None:
            continue
        try:
            found.append((field, StructuredOutputsParams(**{kind: v})))
        except (ValueError, TypeError) as e:
            raise bad_request(f"{field}: {e}", param=field) from None
    if len(found) > 1:
        raise bad_request(f"only one structured output constraint per request; got {', '.join(f for f, _ in found)}",
                          param=found[1][0])
    return found[0][1] if found else None


def _from_response_format(kind: str, extra: dict[str, Any]) -> StructuredOutputsParams:
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = extra.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format.json_schema must be an object with a 'schema'",
                              param="response_format.json_schema")
        name = js.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            raise bad_request("response_format.json_schema.name must be a string of at most 64 characters",
                              param="response_format.json_schema.name")
        schema = js.get("schema", {})
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              param="response_format.json_schema.schema")
        return StructuredOutputsParams(json=schema)
    raise bad_request(f"response_format.type must be text, json_object or json_schema, got {kind[:50]!r}",
                      param="response_format.type")
