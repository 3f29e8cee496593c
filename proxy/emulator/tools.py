"""Tool calls of the LM Studio emulator: whether a request gets one, which tool it calls and with
what arguments (docs/design.md §5.5).

Pure and deterministic but for the call's id: the same request calls the same tool with the same
arguments. How a call looks on the wire is in `proxy.emulator.replies` and `proxy.emulator.native`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A model streams JSON in tokens that split at its punctuation: '{"', 'city', '":"', 'example',
# '"}', as LM Studio's tool-use docs show for a streamed call.
_FRAGMENT = re.compile(r'[{}\[\]":,]+|[^{}\[\]":,]+')
_MAX_DEPTH = 8  # nested (or recursive, through $ref) schemas stop here, with null
_FAMILIES = frozenset({"chat", "response", "message"})

Tool = tuple[str, Mapping[str, Any]]  # a tool's name and the JSON schema of its arguments


@dataclass(frozen=True)
class ToolCall:
    """One call of an offered tool: LM Studio's numeric id, the name, the arguments as JSON."""

    id: str
    name: str
    arguments: str

    @property
    def fragments(self) -> tuple[str, ...]:
        """The arguments in the pieces a stream sends them in."""
        return tuple(_FRAGMENT.findall(self.arguments))

    @property
    def tokens(self) -> int:
        """The call's length in tokens: its name, then each piece of its arguments."""
        return 1 + len(self.fragments)

    @property
    def input(self) -> Any:
        """The arguments, parsed (Anthropic's `input`)."""
        return json.loads(self.arguments)


def pick(kind: str, body: Mapping[str, Any]) -> ToolCall | None:
    """The tool call answering this request, or None for a text answer.

    None when no function tool is offered, when `tool_choice` is none, or when the last turn is
    a tool's result (the model answers it in words). A call when `tool_choice` asks for one
    (`required`, Anthropic's `any`, or a named tool: that one if offered, else the first tool).
    Under `auto`, the default, the first tool whose name the last user message contains
    (case-insensitively) is called; when it names none, the answer is text.
    """
    if kind not in _FAMILIES:
        return None
    offered = _offered(kind, body)
    mode, named = _choice(body.get("tool_choice"))
    turns = _turns(kind, body)
    if not offered or mode == "none" or (turns and _answers_a_tool(kind, turns[-1])):
        return None
    if mode == "required":
        name, schema = next((tool for tool in offered if tool[0] == named), offered[0])
    else:
        said = _user_text(turns).casefold()
        mentioned = [tool for tool in offered if tool[0].casefold() in said]
        if not mentioned:
            return None
        name, schema = mentioned[0]
    value = example(schema)
    arguments = value if isinstance(value, dict) else {}  # arguments are an object, always
    return ToolCall(
        call_id(), name, json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    )


def call_id() -> str:
    """A tool call's id as LM Studio makes them: nine digits, e.g. "365174485"."""
    return str(100_000_000 + secrets.randbelow(900_000_000))


def example(schema: object, root: object = None, depth: int = 0) -> Any:
    """A plausible value for a JSON schema: an object of its required properties, "example" for a
    string, 1 for a number or an integer, true, [] for an array, an enum's first value, a
    `const`, the first choice of an `anyOf`/`oneOf`/`allOf` that is not null; `$ref`s within
    the schema are followed."""
    root = schema if root is None else root
    if depth > _MAX_DEPTH:
        return None
    if not isinstance(schema, Mapping):
        return "example"  # `true` or a schema we cannot read: anything goes
    if isinstance(ref := schema.get("$ref"), str):
        return example(_resolve(ref, root), root, depth + 1)
    if isinstance(enum := schema.get("enum"), list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(options := schema.get(key), list) and options:
            chosen = next((o for o in options if _type(o) != "null"), options[0])
            return example(chosen, root, depth + 1)
    match _type(schema):
        case "object":
            properties = schema.get("properties")
            properties = properties if isinstance(properties, Mapping) else {}
            required = schema.get("required")
            names = (
                [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
            )
            return {name: example(properties.get(name, {}), root, depth + 1) for name in names}
        case "array":
            return []
        case "number" | "integer":
            return 1
        case "boolean":
            return True
        case "null":
            return None
        case _:
            return "example"


def _type(schema: object) -> str | None:
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), Mapping):
        return "object"
    return kind if isinstance(kind, str) else None


def _resolve(ref: str, root: object) -> object:
    """A local `$ref` ("#/$defs/Name") within `root`; {} (anything) when it leads nowhere."""
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or key not in node:
            return {}
        node = node[key]
    return node


def _offered(kind: str, body: Mapping[str, Any]) -> list[Tool]:
    """The function tools offered, in order; other kinds (MCP, Anthropic's server tools) are
    LM Studio's or nobody's business, never the model's to call here."""
    tools = body.get("tools")
    offered: list[Tool] = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, Mapping):
            continue
        if kind == "chat":  # {"type": "function", "function": {"name", "parameters"}}
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
                continue
            name, schema = function.get("name"), function.get("parameters")
        elif kind == "response":  # {"type": "function", "name", "parameters"}
            if tool.get("type") != "function":
                continue
            name, schema = tool.get("name"), tool.get("parameters")
        else:  # Anthropic: {"name", "input_schema"}, with no type or "custom"
            if tool.get("type", "custom") != "custom":
                continue
            name, schema = tool.get("name"), tool.get("input_schema")
        if isinstance(name, str) and name:
            offered.append((name, schema if isinstance(schema, Mapping) else {}))
    return offered


def _choice(value: object) -> tuple[str, str | None]:
    """`tool_choice` in any family's spelling, as ("auto" | "none" | "required", tool name)."""
    mode = value if isinstance(value, str) else "auto"
    if isinstance(value, Mapping):
        mode = value.get("type", "auto")
        if mode in ("function", "tool"):  # OpenAI's {"function": {"name"}}; the others' {"name"}
            function = value.get("function")
            name = function.get("name") if isinstance(function, Mapping) else value.get("name")
            return "required", name if isinstance(name, str) else None
    if mode == "any":
        return "required", None
    return (mode if mode in ("none", "required") else "auto"), None


def _turns(kind: str, body: Mapping[str, Any]) -> list[Any]:
    if kind == "response":
        value = body.get("input")
        return value if isinstance(value, list) else [{"role": "user", "content": value}]
    value = body.get("messages")
    return value if isinstance(value, list) else []


def _answers_a_tool(kind: str, turn: object) -> bool:
    """Whether this turn hands the model a tool's result."""
    if not isinstance(turn, Mapping):
        return False
    if kind == "chat":
        return turn.get("role") in ("tool", "function")
    if kind == "response":
        return turn.get("type") == "function_call_output"
    content = turn.get("content")
    return isinstance(content, list) and any(
        isinstance(block, Mapping) and block.get("type") == "tool_result" for block in content
    )


def _user_text(turns: list[Any]) -> str:
    """The text of the last user message: a string, or its text parts joined."""
    for turn in reversed(turns):
        if isinstance(turn, Mapping) and turn.get("role") == "user":
            content = turn.get("content")
            if isinstance(content, str):
                return content
            parts = content if isinstance(content, list) else []
            return " ".join(
                part["text"]
                for part in parts
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return ""
