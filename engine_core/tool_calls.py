"""OpenAI tool calling on top of structured output.

The format is Hermes' (Qwen 2.5/3, many fine-tunes): the model writes
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. Templates that render ``tools``
themselves (they mention them) get the tools; for the others (SmolLM2's plain ChatML) the tools are
described in a system message, and assistant ``tool_calls`` are written back as that same text,
so a conversation with ``role: "tool"`` results round-trips through any template.

tool_choice:
  none        tools are not shown; plain text
  auto        the model decides; ``<tool_call>`` blocks in its text are parsed out
  required    a grammar forces a JSON array of one or more calls, each ``{"name", "arguments"}``
              with the arguments valid against that function's parameter schema
  {"type": "function", "function": {"name": N}}
              a grammar forces N's arguments (the output text *is* the arguments object)
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from engine_core.structured_output.params import StructuredOutputsParams

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id or new_tool_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "named"
    name: str | None = None


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools` -> the list of function dicts; ValueError naming what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty array")
    out = []
    names = set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string of at most 64 characters")
        if name in names:
            raise ValueError(f"tools[{i}].function.name {name!r} is not unique")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")  # noqa: TRY004 (-> 400)
        out.append({"name": name, "description": fn.get("description") or "", "parameters": params,
                    "strict": bool(fn.get("strict", False))})
    return out


def parse_tool_choice(tool_choice: Any, functions: list[dict[str, Any]] | None) -> ToolChoice:
    if tool_choice is None:
        return ToolChoice("auto" if functions else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be none, auto, required or a function, got {tool_choice[:50]!r}")
        if tool_choice != "none" and not functions:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        return ToolChoice(tool_choice)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not functions or name not in {f["name"] for f in functions}:
            raise ValueError(f"tool_choice names function {str(name)[:64]!r}, which is not in tools")
        return ToolChoice("named", name)
    raise ValueError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")


def tool_call_constraint(choice: ToolChoice, functions: list[dict[str, Any]],
                         parallel_tool_calls: bool = True) -> StructuredOutputsParams | None:
    """The grammar that enforces tool_choice (None for none/auto). parallel_tool_calls=False: at
    most one call under "required"."""
    if choice.mode == "named":
        fn = next(f for f in functions if f["name"] == choice.name)
        return StructuredOutputsParams(json=fn["parameters"])
    if choice.mode == "required":
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                  "required": ["name", "arguments"]} for f in functions]
        array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if not parallel_tool_calls:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array)
    return None


# ---------------------------------------------------------------------------- prompt side
def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tools_system_prompt(functions: list[dict[str, Any]]) -> str:
    specs = "\n".join(json.dumps({"type": "function", "function": {
        "name": f["name"], "description": f["description"], "parameters": f["parameters"]}}, ensure_ascii=False)
        for f in functions)
    return ("You may call one or more functions to assist with the user query. The functions you can call "
            f"are described in JSON below.\n<tools>\n{specs}\n</tools>\n"
            "To call a function, reply with a JSON object holding its name and arguments inside tags:\n"
            f'{TOOL_CALL_START}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_END}')


def messages_for_template(messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None,
                          chat_template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (+ template kwargs) that show the tools and past tool calls to a template that does
    not render them itself. Templates that do get `tools=` and the messages unchanged."""
    if template_renders_tools(chat_template):
        return messages, ({"tools": [{"type": "function", "function": {
            k: f[k] for k in ("name", "description", "parameters")}} for f in functions]} if functions else {})
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise ValueError(f"messages[{i}].tool_calls must be an array of tool call objects")
        if m.get("role") == "assistant" and calls:
            text = "\n".join(f"{TOOL_CALL_START}\n{json.dumps(_call_dict(c), ensure_ascii=False)}\n{TOOL_CALL_END}"
                             for c in calls)
            content = m.get("content") or ""
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{content}\n{text}" if content else text
        out.append(m)
    if functions:
        prompt = tools_system_prompt(functions)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _call_dict(c: dict[str, Any]) -> dict[str, Any]:
    fn = c.get("function")
    fn = fn if isinstance(fn, dict) else {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return {"name": fn.get("name", ""), "arguments": args}


# ---------------------------------------------------------------------------- output side
def parse_tool_calls(text: str, choice: ToolChoice) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) from the model's text under tool_choice."""
    if choice.mode == "named":
        return None, [ToolCall(choice.name or "", text.strip(), new_tool_call_id())]
    if choice.mode == "required":
        items = _complete_array_items(text)
        calls = [ToolCall(str(it["name"]), json.dumps(it.get("arguments", {}), ensure_ascii=False), new_tool_call_id())
                 for it in items if isinstance(it, dict) and "name" in it]
        return (None if calls else text), calls
    if choice.mode == "auto" and TOOL_CALL_START in text:
        calls, rest, pos = [], [], 0
        while True:
            start = text.find(TOOL_CALL_START, pos)
            if start < 0:
                rest.append(text[pos:])
                break
            rest.append(text[pos:start])
            end = text.find(TOOL_CALL_END, start)
            body = text[start + len(TOOL_CALL_START): end if end >= 0 else len(text)]
            try:
                d = json.loads(body)
                calls.append(ToolCall(str(d["name"]), json.dumps(d.get("arguments", {}), ensure_ascii=False),
                                      new_tool_call_id()))
            except (ValueError, KeyError, TypeError):
                rest.append(text[start: end + len(TOOL_CALL_END) if end >= 0 else len(text)])
            if end < 0:
                break
            pos = end + len(TOOL_CALL_END)
        content = "".join(rest).strip()
        return (content or None), calls
    return text, []


def _complete_array_items(text: str) -> list[Any]:
    """The complete elements of a JSON array, also when max_tokens cut it short (the calls the
    model finished are kept; a partial last one is dropped)."""
    try:
        items = json.loads(text)
        return items if isinstance(items, list) else []
    except ValueError:
        pass
    dec = json.JSONDecoder()
    i = text.find("[")
    out: list[Any] = []
    if i < 0:
        return out
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            item, i = dec.raw_decode(text, i)
        except ValueError:
            return out
        out.append(item)


def held_back_prefix(text: str) -> int:
    """How many trailing characters of streamed text might begin a `<tool_call>` tag (auto mode
    holds them back until it knows)."""
    for k in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-k:]):
            return k
    return 0
