"""What a model folder says about its tokenizer beyond the sentencepiece model: added tokens, special
token names, end-of-turn ids, how text segments get sentencepiece's "▁" prefix, and the chat template.

Hugging Face spreads this over several files, and different tools write different subsets of them
(the hub's originals, transformers 4 and 5, mlx-lm), so every fact is read from every file that can
hold it:

* added tokens: `tokenizer.json` "added_tokens", `tokenizer_config.json` "added_tokens_decoder",
  `added_tokens.json` ({content: id}); special when any of them says so or a special-token field
  (bos/eos/unk/pad, additional_special_tokens) names the token;
* end of turn: the tokenizer's eos plus `generation_config.json` and `config.json` "eos_token_id"
  (an int or a list), as mlx-lm does;
* how transformers 5 normalizes each text segment between added tokens (`Normalization`):
  tokenizer.json's normalizer and pre-tokenizer, or its conversion of tokenizer.model (by
  `legacy`), see `_normalization`;
* the chat template: `chat_template.jinja`, else `chat_template.json`, else "chat_template" in
  tokenizer_config.json (a string, or a list of named templates), the order transformers reads them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MixtralError
from ..files import reason

SPACE = "\u2581"
_SPECIAL_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedToken:
    """A token Hugging Face matches in text before sentencepiece sees it (e.g. ChatML's `<|im_end|>`)."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class Normalization:
    """How transformers turns one text segment into the "▁"-escaped string its BPE model splits.

    `steps` are the normalizer's (kind, a, b): ("prepend", text, "") or ("replace", pattern, content)
    with `pattern` a compiled-able regex; `scheme` is the Metaspace pre-tokenizer's prepend scheme
    ("always", "first", "never"), or None without a Metaspace step.
    """

    steps: tuple[tuple[str, str, str], ...] = ()
    scheme: str | None = "always"

    def apply(self, text: str, at_start: bool) -> str:
        """The escaped form of `text`; `at_start`: whether it begins the whole input (for "first")."""
        for kind, a, b in self.steps:
            if kind == "prepend":
                text = a + text if text else text
            else:
                text = re.sub(a, lambda _m, b=b: b, text)
        if self.scheme is not None:
            text = text.replace(" ", SPACE)
            prepend = self.scheme == "always" or (self.scheme == "first" and at_start)
            if prepend and text and not text.startswith(SPACE):
                text = SPACE + text
        return text


@dataclass
class TokenizerFiles:
    """Everything beyond `tokenizer.model` that decides how text becomes ids and back."""

    folder: Path | None = None
    added: list[AddedToken] = field(default_factory=list)
    special_names: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    extra_eos_ids: set[int] = field(default_factory=set)
    normalization: Normalization = field(default_factory=Normalization)
    template: str | dict[str, str] | None = None
    template_origin: str = ""

    @classmethod
    def read(cls, folder: Path) -> TokenizerFiles:
        """Read the folder's tokenizer files (missing files are simply absent facts)."""
        config = _json(folder / "tokenizer_config.json") or {}
        tokenizer_json = _json(folder / "tokenizer.json")
        files = cls(folder=folder)
        specials_map = _json(folder / "special_tokens_map.json") or {}
        for name in _SPECIAL_FIELDS:
            value = _token_name(config.get(name)) or _token_name(specials_map.get(name))
            if value:
                files.special_names[name] = value
        named_special = set(files.special_names.values())
        for key in ("additional_special_tokens",):
            for source in (config, specials_map):
                for entry in source.get(key) or []:
                    if _token_name(entry):
                        named_special.add(_token_name(entry))
        files.added = _added_tokens(folder, config, tokenizer_json, named_special)
        for source in ("generation_config.json", "config.json"):
            files.extra_eos_ids |= _eos_ids(_json(folder / source), folder / source)
        files.normalization = _normalization(tokenizer_json, config)
        files.template, files.template_origin = _template(folder, config)
        return files


def _json(path: Path) -> Any:
    """A JSON file's content, None when absent; a broken file is a one-line error naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MixtralError(f"cannot read {path}: {reason(error)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise MixtralError(f"Cannot read {path}: {error}; fix or remove the file") from None


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _added_tokens(folder: Path, config: dict, tokenizer_json: Any, named_special: set[str]) -> list[AddedToken]:
    by_id: dict[int, AddedToken] = {}

    def add(token_id: Any, entry: dict, source: str) -> None:
        content = entry.get("content")
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0 or not isinstance(content, str):
            raise MixtralError(f"{folder / source}: added token {entry!r} needs an integer id and a string content")
        if not content:
            return
        special = bool(entry.get("special", False)) or content in named_special
        previous = by_id.get(token_id)
        if previous is not None:
            special = special or previous.special
        by_id[token_id] = AddedToken(token_id, content, special, bool(entry.get("lstrip")), bool(entry.get("rstrip")))

    if isinstance(tokenizer_json, dict):
        for entry in tokenizer_json.get("added_tokens") or []:
            if isinstance(entry, dict):
                add(entry.get("id"), entry, "tokenizer.json")
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            if isinstance(entry, dict):
                add(int(key) if str(key).isdigit() else key, entry, "tokenizer_config.json")
    added_json = _json(folder / "added_tokens.json")
    if isinstance(added_json, dict):
        for content, token_id in added_json.items():
            add(token_id, {"content": content}, "added_tokens.json")
    return sorted(by_id.values(), key=lambda t: t.id)


def _eos_ids(config: Any, path: Path) -> set[int]:
    if not isinstance(config, dict) or config.get("eos_token_id") is None:
        return set()
    value = config["eos_token_id"]
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise MixtralError(f"{path}: eos_token_id {value!r} is not an id or a list of ids")
    return set(values)


def _normalization(tokenizer_json: Any, config: dict) -> Normalization:
    """What transformers 5 does for a Mixtral folder (config.json's model_type "mixtral" gives its
    generic tokenizers backend): tokenizer.json's own normalizer and pre-tokenizer when the folder
    has one; else its conversion of tokenizer.model, which for `legacy` true (or absent) escapes
    spaces, doubles a leading "▁" and prepends "▁" to every segment, and otherwise prepends to the
    first segment of the input only."""
    if not isinstance(tokenizer_json, dict):
        if config.get("legacy", True) is False:
            return Normalization((("replace", " ", SPACE),), "first")
        return Normalization((("replace", " ", SPACE), ("replace", r"\A" + SPACE, SPACE * 2)), "always")
    steps: list[tuple[str, str, str]] = []
    for step in _flatten(tokenizer_json.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Prepend":
            steps.append(("prepend", str(step.get("prepend", "")), ""))
        elif kind == "Replace":
            pattern = step.get("pattern") or {}
            regex = pattern.get("Regex") if "Regex" in pattern else re.escape(str(pattern.get("String", "")))
            steps.append(("replace", regex, str(step.get("content", ""))))
    scheme = None
    for step in _flatten(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
    return Normalization(tuple(steps), scheme)


def _flatten(step: Any, key: str) -> list[dict]:
    if not isinstance(step, dict):
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step.get(key) or [] for s in _flatten(inner, key)]
    return [step]


def _template(folder: Path, config: dict) -> tuple[str | dict[str, str] | None, str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), "chat_template.jinja"
        except (OSError, UnicodeDecodeError) as error:
            raise MixtralError(f"Cannot read {jinja}: {error}") from None
    data = _json(folder / "chat_template.json")
    if isinstance(data, dict) and data.get("chat_template"):
        return _named(data["chat_template"], folder / "chat_template.json"), "chat_template.json"
    if config.get("chat_template"):
        return _named(config["chat_template"], folder / "tokenizer_config.json"), "tokenizer_config.json"
    return None, ""


def _named(value: Any, path: Path) -> str | dict[str, str]:
    """A template string, or transformers' list of {"name", "template"} as a dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise MixtralError(f"{path}: chat_template must be a string or a list of {{name, template}} objects")
