"""Grammars for what a reply may be, written as llguidance's Lark: JSON (any object, or one that
matches a JSON schema), and tool calls in the syntax a model writes them (`ToolSyntax`).

JSON is written on one line with fixed separators (compact by default: `{"a":1,"b":[2,3]}`); a
grammar that allows any whitespace lets a model emit whitespace until it runs out of tokens. One
optional space may come first, because a sentencepiece reply's first piece usually carries "▁".

An object schema that lists its properties and says nothing of others gets only those (`closed`).

A tool-call grammar allows either text (or the response format's JSON) or the calls: the
syntax's marker, then `{"name": ..., "arguments": ...}` objects (a JSON list, or each in the
template's wrapper), written with the separators the model was trained on (`ToolSyntax`), each
tool's arguments held to its own parameters schema (kept whole as a root schema, so its `$defs`
and `$ref`s still resolve).
Text that merely starts like the marker is not allowed, so a reply is calls or text, never both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MixtralError
from ..tokenizer import ToolSyntax

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

COMPACT = (",", ":")
_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Grammar:
    """A Lark grammar for llguidance, and what it constrains (for error messages)."""

    lark: str
    what: str


def _json_rule(name: str, schema: dict, separators: tuple[str, str]) -> str:
    """`name: %json {...}`: llguidance's JSON schema rule, whitespace fixed to `separators`."""
    options = {"whitespace_flexible": False, "item_separator": separators[0], "key_separator": separators[1]}
    return f"{name}: %json {json.dumps({**closed(schema), 'x-guidance': options})}"


_SUBSCHEMAS = ("items", "additionalItems", "contains", "propertyNames", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def closed(schema: Any, close: bool = True) -> Any:
    """`schema` with every object that lists its `properties` but does not say
    `additionalProperties` closed to them (llama.cpp's default): a model that rambles would
    otherwise add keys until it runs out of tokens, and what it writes still validates against
    the schema as given. `additionalProperties: true` or a schema for them, `patternProperties`
    and `unevaluatedProperties` are honoured as written; an object without `properties` stays any
    object; the branches of an `allOf` stay open (each sees only part of the keys)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = [closed(s) for s in out[key]] if isinstance(out[key], list) else closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed(s, close=False) for s in out["allOf"]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(s) for k, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if (close and isinstance(out.get("properties"), dict) and not {"additionalProperties", "patternProperties",
                                                                    "unevaluatedProperties"} & out.keys()
            and "allOf" not in out):
        out["additionalProperties"] = False
    return out


def _schema(value: Any, what: str) -> dict:
    if value is True or value is None:
        return dict(_ANY_OBJECT)
    if not isinstance(value, dict):
        raise MixtralError(f"{what} must be a JSON schema object, got {json.dumps(value)[:60]}")
    return value


def json_grammar(schema: dict | bool | None = None, separators: tuple[str, str] = COMPACT,
                 what: str = "the JSON schema") -> Grammar:
    """Any JSON object (`schema` None or True) or JSON matching `schema`."""
    return Grammar(f'start: " "? body\n{_json_rule("body", _schema(schema, what), separators)}\n', what)


def text_grammar(syntax: ToolSyntax) -> Grammar:
    """Text only, no tool call: the reply of a request with tool_choice "none"."""
    return Grammar(f"start: TEXT\n{_text_lexeme(syntax)}\n", "tool_choice none")


def tool_grammar(syntax: ToolSyntax, tools: Sequence[dict], required: bool, only: str | None = None,
                 parallel: bool = True, text: Grammar | None = None) -> Grammar:
    """Calls to `tools` (OpenAI tool objects) in `syntax`; or, unless `required` (or `only`, the one
    function to call), text: plain, or `text`'s JSON when a response format is set too."""
    rules = []
    names = []
    for index, tool in enumerate(tools):
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        names.append(f"call_{index}")
        opening = json.dumps({"name": function["name"], "arguments": 0}, separators=syntax.separators)[:-2]
        rules.append(f'call_{index}: {json.dumps(opening)} args_{index} "}}"')  # '{"name": "f", "arguments": '
        rules.append(_json_rule(f"args_{index}", _schema(function.get("parameters"), f"tools[{index}].parameters"),
                                syntax.separators))
    if not names:
        raise MixtralError(f"tool_choice names {only!r}, which is not among the tools")
    more = f" ({_literal(syntax.between, syntax)} call)*" if parallel else ""
    optional_space = '" "? ' if syntax.opening.startswith(" ") else ""
    opening = optional_space + _literal(syntax.opening.removeprefix(" ") if optional_space else syntax.opening, syntax)
    mark = f"<[{syntax.marker_id}]>" if syntax.marker_id is not None else "MARK"
    lines = [f"calls: {mark} {opening} call{more} {_literal(syntax.closing, syntax)}", f"call: {' | '.join(names)}",
             *rules]
    if syntax.marker_id is None:
        lines.append(f"MARK: / ?{_escape(syntax.marker)}/")
    if required or only is not None:
        start = "start: calls"
    elif text is not None:
        start = "start: reply | calls"
        lines += [line.replace("start:", "reply:", 1) for line in text.lark.splitlines() if line]
    else:
        start = "start: TEXT | calls"
        lines.append(_text_lexeme(syntax))
    return Grammar("\n".join([start, *lines]) + "\n", "the tools' parameters")


def _literal(text: str, syntax: ToolSyntax) -> str:
    """`text` as Lark: quoted literals, with the marker as its special id where it has one."""
    if syntax.marker_id is None:
        return json.dumps(text) if text else '""'
    parts = [json.dumps(part) if part else "" for part in text.split(syntax.marker)]
    return f" <[{syntax.marker_id}]> ".join(parts).strip() or '""'


def _text_lexeme(syntax: ToolSyntax) -> str:
    """Any text that does not start (after whitespace) with the marker typed as text."""
    return f"TEXT: /(?s:.*)/ & ~/(?s:\\s*{_escape(syntax.marker)}.*)/"


_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~/")


def _escape(text: str) -> str:
    """`text` matched literally inside a Lark /regex/ (only the characters that mean something are
    escaped: an escaped letter or `<` means something else to llguidance's regex engine)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else {"\n": "\\n", "\t": "\\t"}.get(c, c) for c in text)


def check(grammar: Grammar, tokenizer: Tokenizer) -> None:
    """Raise a one-line MixtralError naming what llguidance cannot compile in `grammar`."""
    import llguidance  # on first use (see vocabulary)

    from .vocabulary import llg_tokenizer

    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar.lark),
                                                  llg_tokenizer(tokenizer))
    if error:
        raise MixtralError(f"{grammar.what} cannot be enforced: {one_line(error)}")


def one_line(error: str) -> str:
    """llguidance's message in one line: its first line, plus the line saying what failed."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    lines[0] = re.sub(r"^at \d+\(\d+\): ", "", lines[0])  # where in our Lark text: not the user's business
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return lines[0].rstrip(":") + (f" ({detail.removeprefix('error:').strip()})" if detail else "")
