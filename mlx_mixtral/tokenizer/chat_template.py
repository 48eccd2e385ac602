"""A folder's Jinja chat template, rendered as transformers' `apply_chat_template` renders it.

The environment is transformers': a sandboxed (immutable) jinja2 environment with trim_blocks and
lstrip_blocks, the loop-controls extension, a `{% generation %}` block that renders its body,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the special tokens
(`bos_token`, `eos_token`, `unk_token`, `pad_token`) as variables beside `messages`, `tools`,
`documents` and `add_generation_prompt`. Named templates (a list in tokenizer_config.json) pick
"tool_use" when the request has tools and it exists, else "default".

One thing differs on purpose: text that comes from messages and tools stays text. Before
rendering, every added token (`<|im_end|>`, `<s>`, ...) written in their strings is wrapped in
private-use markers; after rendering, added tokens become ids only outside the markers, so
`<|im_end|>` typed in a message cannot end a turn early (mistral-common behaves the same way; so
does transformers' `sanitize_control_tokens`). Where no message holds such markup, the ids are
transformers' ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import MixtralError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

START, END = "\U000f0000", "\U000f0001"  # private-use markers around message text (as transformers)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TemplateFormat:
    """A chat format given by a Jinja template from the model's folder."""

    kind = "template"

    def __init__(self, tokenizer: Tokenizer, template: str | dict[str, str], origin: str) -> None:
        self._tokenizer = tokenizer
        self.templates = template if isinstance(template, dict) else {"default": template}
        self.origin = origin
        self.name = f"chat template from {origin}"
        self.supports_tools = any("tools" in t for t in self.templates.values())
        digest = hashlib.sha256(json.dumps(self.templates, sort_keys=True).encode("utf-8", "surrogatepass"))
        self.fingerprint = f"template:{digest.hexdigest()[:16]}"
        self._compiled: dict[str, Any] = {}
        self.tool_calls_id = None

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation (added tokens written by the template become ids)."""
        return self._tokenizer.encode_marked(self.render(messages, tools, add_generation_prompt), (START, END))

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The template's text for `messages`, message text wrapped in the markers. A final
        assistant message with `prefix: true` is continued (transformers' continue_final_message)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise MixtralError("The conversation is empty: give at least one message.")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise MixtralError(f"Message {index} must be a dict with a 'role' and 'content'.")
        name = "tool_use" if tools and "tool_use" in self.templates else "default"
        if name not in self.templates:
            raise MixtralError(f"the {self.origin} templates {sorted(self.templates)} have no 'default'")
        chat = [dict(m) for m in messages]
        prefix = chat[-1].pop("prefix", False) is True and chat[-1]["role"] == "assistant"
        for message in chat[:-1]:
            message.pop("prefix", None)
        final = chat[-1].get("content") if prefix else None
        if prefix:
            if not isinstance(final, str):
                raise MixtralError("the assistant message to continue (prefix=True) needs string content")
            chat[-1]["content"] = final + _CONTINUE_TAG
        variables = dict(self._tokenizer.files.special_names)
        mark = self._tokenizer.special_pattern
        try:
            text = self._template(name).render(
                messages=_marked(chat, mark), tools=_marked(list(tools), mark) if tools else None, documents=None,
                add_generation_prompt=add_generation_prompt and not prefix, **variables)
        except MixtralError:
            raise
        except Exception as error:  # TemplateError from raise_exception, or the template's own bug
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MixtralError(f"the chat template from {self.origin} refused this conversation: {message}") from None
        if prefix:
            tag = _CONTINUE_TAG.strip()
            at = text.rfind(tag)
            if at < 0:
                raise MixtralError(f"the chat template from {self.origin} drops the assistant message to continue")
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return text

    def special_id(self, text: str) -> int | None:
        """The id of `text` when it is a special added token (which decodes to nothing), else None."""
        token = self._tokenizer.token_id(text)
        return token if token is not None and token in self._tokenizer.added and self._tokenizer.is_control(token) else None

    def _template(self, name: str):
        if name not in self._compiled:
            self._compiled[name] = _compile(self.templates[name], self.origin)
        return self._compiled[name]


def _marked(value: Any, pattern: re.Pattern | None) -> Any:
    """`value` as plain JSON data in which every added token written in a string is wrapped in the
    markers (and markers already there are removed, so none can be forged)."""
    if isinstance(value, str):
        value = value.replace(START, "").replace(END, "")
        return pattern.sub(lambda m: START + m.group(0) + END, value) if pattern is not None else value
    if isinstance(value, dict):
        return {str(k): _marked(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_marked(v, pattern) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def _compile(source: str, origin: str):
    """The template compiled in transformers' sandboxed environment (see the module docstring).
    jinja2 is imported here, on first use: only models with a template need it."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markup) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise MixtralError(f"the chat template in {origin} does not compile (line {error.lineno}: {error.message}); "
                           "fix the template") from None
