"""Mixtral's tokenizer: sentencepiece for text, the folder's added tokens around it, its chat format.

`tokenizer.model` is used through sentencepiece directly: mistral-common (the reference for the
Mistral chat formats) encodes with plain sentencepiece, and Hugging Face's tokenizers split some
whitespace runs differently. A folder with only `tokenizer.json` (what recent `mlx_lm convert`
writes) gets the equivalent sentencepiece model rebuilt from it (`sentencepiece_json`).

Two ways to encode, for two kinds of text:
* `encode_text`: plain text (chat message content): added and control tokens written in it stay
  text, as mistral-common does, so a user cannot inject `<|im_end|>` or `[INST]` into a prompt.
* `encode`: a raw prompt the user writes whole (`generate --raw`, `/v1/completions`): added and
  control tokens written as text become their ids (as transformers, mlx-lm and llama.cpp do). The
  text between them is split as the model was trained: for a model with a Jinja chat template
  (a fine-tune trained through transformers) exactly as transformers' tokenizer for this folder
  splits it (`tokenizer_files.Normalization`, the folder's merge order), so typing the model's own
  chat markup gives transformers' ids. The same for Mistral's own tokenizers and base models: a
  folder that is not `legacy` puts the "▁" prefix only at the very start of the text, so text
  typed after a control token (`[INST] Hello`) gets the ids the model was trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from ..errors import MixtralError
from .chat_formats import choose_format
from .detokenizer import StreamingDetokenizer
from .sentencepiece_json import model_proto_from_tokenizer_json
from .tokenizer_files import SPACE, AddedToken, TokenizerFiles

_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"  # ModelProto.normalizer_spec(3) { add_dummy_prefix(3): false }, merged last


class Tokenizer:
    """A sentencepiece model plus the folder's added tokens, end-of-turn ids and chat format."""

    def __init__(self, model_file: str | os.PathLike, model_proto: bytes | None = None,
                 files: TokenizerFiles | None = None) -> None:
        """Load the sentencepiece model `model_file`, or `model_proto` (its serialized bytes) if given.

        `model_file` is the file the tokenizer came from: `tokenizer.model`, or the `tokenizer.json`
        that `model_proto` was rebuilt from (see `from_tokenizer_json`). `files` is what the folder
        says beyond it (added tokens, eos ids, template); without it the chat format is chosen from
        the vocabulary alone.
        """
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise MixtralError(f"Tokenizer file not found: {self.model_file}")
        try:
            if model_proto is None:
                self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
            else:
                self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
            proto = self._sp.serialized_model_proto()
        except (OSError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MixtralError(f"Cannot read tokenizer {self.model_file}: {reason}") from None
        self.files = files or TokenizerFiles()
        self._sp_hf: spm.SentencePieceProcessor | None = None  # built on first use (template models)
        self.sp_vocab_size: int = self._sp.vocab_size()
        self.added: dict[int, AddedToken] = {t.id: t for t in self._added_tokens()}
        self.vocab_size: int = max([self.sp_vocab_size, *(i + 1 for i in self.added)])
        self._by_text = {t.content: t for t in self.added.values()}
        self.bos_id: int = self._named_id("bos_token", self._sp.bos_id())
        self.eos_id: int = self._named_id("eos_token", self._sp.eos_id())
        # Generation ends at any of these (tokenizer, generation_config.json and config.json, as mlx-lm).
        self.eos_token_ids: set[int] = {self.eos_id, *self.files.extra_eos_ids} - {-1}
        self.special_pattern = _alternation(sorted(self._by_text, key=len, reverse=True))
        self._context_id, self._context_text = self._pick_context_piece()
        # Tells tokenizers apart (saved KV caches record the ids of one tokenizer).
        digest = hashlib.sha256(proto)
        for token in sorted(self.added.values(), key=lambda t: t.id):
            digest.update(f"\0{token.id}\0{token.content}\0{token.special:d}".encode())
        self.fingerprint = digest.hexdigest()[:32]
        self.chat_format = choose_format(self)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load `folder/tokenizer.model`, else the same model rebuilt from `folder/tokenizer.json`,
        with everything else the folder's files say (see `tokenizer_files`)."""
        folder = Path(folder)
        model, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        if not model.is_file() and not json_file.is_file():
            raise MixtralError(f"No tokenizer.model or tokenizer.json in {folder}: is it a Mixtral model folder?")
        files = TokenizerFiles.read(folder)
        if model.is_file():
            return cls(model, files=files)
        return cls(json_file, model_proto=model_proto_from_tokenizer_json(json_file), files=files)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Tokenizer:
        """The sentencepiece model equivalent to a Llama/Mistral-style Hugging Face `tokenizer.json`."""
        path = Path(path)
        if not path.is_file():
            raise MixtralError(f"Tokenizer file not found: {path}")
        return cls(path, model_proto=model_proto_from_tokenizer_json(path))

    def save_model(self, path: str | os.PathLike) -> None:
        """Write the sentencepiece model as a `tokenizer.model` file (e.g. one rebuilt from tokenizer.json)."""
        Path(path).write_bytes(self._sp.serialized_model_proto())

    # --- encoding ----------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Plain sentencepiece ids of `text` (dummy "▁" prefix, no BOS/EOS, no added tokens)."""
        return self._sp.encode(_checked(text))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of a raw prompt: added and control tokens written in it become their ids (see module doc)."""
        ids = [self.bos_id] if bos else []
        return ids + self.encode_marked(_checked(text))

    def encode_marked(self, text: str, protected: tuple[str, str] | None = None) -> list[int]:
        """Ids of `text` whose added tokens become ids, except inside `protected` markers.

        A chat template renders message content wrapped as `start + content + end` (see
        `chat_template`): added tokens found there are text. Text runs between the ids are
        normalized as transformers does for this folder, so a template gives transformers' ids.
        """
        ids: list[int] = []
        run: list[str] = []
        run_start = 0
        pos = 0
        pieces = _split_protected(_checked(text), protected)
        for piece, is_content in pieces:
            if is_content or self.special_pattern is None:
                run.append(piece)
                pos += len(piece)
                continue
            last = 0
            for match in self.special_pattern.finditer(piece):
                token = self._by_text[match.group(0)]
                before = piece[last:match.start()]
                if token.lstrip:
                    before = before.rstrip()
                run.append(before)
                ids += self._encode_run("".join(run), at_start=run_start == 0)
                ids.append(token.id)
                run, last = [], match.end()
                if token.rstrip:
                    rest = piece[last:]
                    last += len(rest) - len(rest.lstrip())
                run_start = pos + last
            run.append(piece[last:])
            pos += len(piece)
        return ids + self._encode_run("".join(run), at_start=run_start == 0)

    def _encode_run(self, text: str, at_start: bool) -> list[int]:
        """Ids of a run of text between added tokens, as transformers' normalization makes it for
        this folder (its `legacy` flag or tokenizer.json): for Mistral's own folders too, where a
        non-legacy tokenizer gives `[INST] Hello` as `[INST] ▁Hello`, the form the model was trained
        on, not sentencepiece's `[INST] ▁ ▁Hello`. A bare tokenizer.model (no folder) has no
        transformers counterpart: sentencepiece's split, as mistral-common's."""
        if not text:
            return []
        if self.files.folder is None:
            return self._sp.encode(text)
        if self._sp_hf is None:
            self._sp_hf = self._transformers_model()
        return self._sp_hf.encode(self.files.normalization.apply(text, at_start))

    # --- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: sentencepiece's decoding (BOS/EOS and other control ids vanish, <unk> is
        " ⁇ ", bad bytes U+FFFD); special added tokens vanish too, others are their text, and an id
        this tokenizer does not know becomes a visible placeholder instead of an error."""
        ids = [int(i) for i in ids]
        if all(0 <= i < self.sp_vocab_size for i in ids):
            return self._sp.decode(ids)
        detokenizer = self.detokenizer()
        for i in ids:
            detokenizer.add_token(i)
        detokenizer.finalize()
        return detokenizer.text

    def id_to_text(self, token: int) -> str | None:
        """None for an id sentencepiece decodes; else the text it stands for: "" for a special added
        token (like a control piece), an added token's text, or a placeholder for an unknown id."""
        if 0 <= token < self.sp_vocab_size:
            return None
        added = self.added.get(token)
        if added is not None:
            return "" if added.special else added.content
        return f"<unk {token}>"

    def token_bytes(self, token: int) -> bytes:
        """The bytes `token` stands for in text: a piece's UTF-8 with "▁" as a space, a byte piece's
        byte, an added token's content; a control or special token gives its name (as logprobs and
        constrained decoding show it), an unknown id b"". Whether a piece's "▁" shows at the very
        start of a text is the decoder's business, not this."""
        added = self.added.get(token)
        if added is not None:
            return added.content.encode()
        if not 0 <= token < self.sp_vocab_size:
            return b""
        piece = self._sp.id_to_piece(token)
        if self._sp.IsByte(token):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE, " ").encode()

    def token_id(self, text: str) -> int | None:
        """The single id that `text` is (an added token or a sentencepiece piece), or None."""
        if text in self._by_text:
            return self._by_text[text].id
        piece_id = self._sp.piece_to_id(text)
        return piece_id if piece_id != self._sp.unk_id() or text == self._sp.id_to_piece(piece_id) else None

    def is_control(self, token: int) -> bool:
        """Whether `token` is a control piece or a special added token (it decodes to nothing)."""
        added = self.added.get(token)
        if added is not None:
            return added.special
        return 0 <= token < self.sp_vocab_size and self._sp.IsControl(token)

    def detokenizer(self, shown: Sequence[int] = ()) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence; the control ids in `shown`
        appear as their names (a reply read for tool calls sees where `[TOOL_CALLS]` was)."""
        return StreamingDetokenizer(self, shown)

    # --- chat --------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a conversation, in the format the model was trained on (`chat_format`):
        mistral-common's for Mistral's tokenizers, the folder's Jinja template otherwise, plain
        text for a base model."""
        return self.chat_format.encode(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    # --- helpers -----------------------------------------------------------------------------

    def _transformers_model(self) -> spm.SentencePieceProcessor:
        """Sentencepiece set up to split text as transformers 5 does for this folder: with its
        tokenizer.json's merge order when it has one (it may rank runs of "▁" early, unlike
        sentencepiece), else with tokenizer.model's own scores (transformers' conversion keeps
        them); no dummy prefix (the normalization adds "▁" where transformers does)."""
        proto = self._sp.serialized_model_proto()
        json_file = self.files.folder / "tokenizer.json" if self.files.folder is not None else None
        if json_file is not None and json_file.is_file():
            try:
                proto = model_proto_from_tokenizer_json(json_file, as_transformers=True)
            except MixtralError:  # not Llama-style: tokenizer.model is what we have
                pass
        return spm.SentencePieceProcessor(model_proto=proto + _NO_DUMMY_PREFIX)

    def _added_tokens(self) -> list[AddedToken]:
        """The folder's added tokens plus sentencepiece's control and unknown pieces, which
        transformers also matches in text (its converter adds them as special tokens)."""
        sp = self._sp
        tokens = {i: AddedToken(i, sp.id_to_piece(i), special=bool(sp.IsControl(i)))
                  for i in range(self.sp_vocab_size)
                  if (sp.IsControl(i) or sp.IsUnknown(i)) and sp.id_to_piece(i)}
        for token in self.files.added:
            tokens[token.id] = token
        return list(tokens.values())

    def _named_id(self, name: str, default: int) -> int:
        text = self.files.special_names.get(name)
        if text is None:
            return default
        token = self.token_id(text)
        return default if token is None else token

    def _pick_context_piece(self) -> tuple[int, str]:
        """A normal piece without a leading "▁", whose text marks "not at the start of the text"."""
        sp = self._sp
        for piece_id in range(self.sp_vocab_size):
            if sp.IsControl(piece_id) or sp.IsUnknown(piece_id) or sp.IsByte(piece_id) or sp.IsUnused(piece_id):
                continue
            if piece_id in self.added:
                continue
            if not sp.id_to_piece(piece_id).startswith(SPACE):
                return piece_id, sp.decode([piece_id])
        raise MixtralError(f"Tokenizer {self.model_file} has no ordinary piece; is it a SentencePiece BPE model?")


def _checked(text: str) -> str:
    """`text`, refused in one line if sentencepiece cannot take it (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MixtralError("the text holds a lone UTF-16 surrogate (invalid Unicode); send valid UTF-8 text") from None
    return text


def _alternation(strings: list[str]) -> re.Pattern | None:
    """A regex matching any of `strings`, longest first, as a trie (fast with hundreds of tokens)."""
    if not strings:
        return None
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = True

    def pattern(node: dict) -> str:
        options = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not options:
            return ""
        body = options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(pattern(trie))


def _split_protected(text: str, protected: tuple[str, str] | None) -> list[tuple[str, bool]]:
    """`text` cut into (piece, inside markers) parts; markers removed, unpaired ones dropped."""
    if protected is None:
        return [(text, False)]
    start, end = protected
    parts: list[tuple[str, bool]] = []
    for i, outer in enumerate(text.split(start)):
        if i == 0:
            parts.append((outer.replace(end, ""), False))
            continue
        inner, sep, rest = outer.partition(end)
        parts.append((inner, True))
        parts.append((rest.replace(end, ""), False))
        if not sep:  # a start marker without its end: what followed was content all along
            parts.pop()
    return parts
