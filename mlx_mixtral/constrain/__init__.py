"""Constrained decoding: replies held to a grammar token by token (JSON schemas, tool calls).

`grammars` writes the grammars (plain Lark text, no dependency); `vocabulary` shows llguidance
our tokenizer; `constraint.Constraint` is one reply's matcher, which the sampler asks for the
tokens allowed next. llguidance (MIT, no dependencies) computes a mask in microseconds.
"""

from .constraint import Constraint
from .grammars import Grammar, check, json_grammar, text_grammar, tool_grammar

__all__ = ["Constraint", "Grammar", "check", "json_grammar", "text_grammar", "tool_grammar"]
