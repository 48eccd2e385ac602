"""Rebuild a SentencePiece `tokenizer.model` from a Llama/Mistral-style Hugging Face `tokenizer.json`.

Folders written by recent `mlx_lm convert` (transformers 5) hold only `tokenizer.json`. For a
Llama/Mistral tokenizer that file is a translation of the original SentencePiece BPE model, from
which the model is rebuilt here and used through sentencepiece itself (see `tokenizer.py` for why
sentencepiece and not HF tokenizers):

* pieces: the BPE vocab in id order. `<0xNN>` pieces are BYTE; the model's `unk_token` is UNKNOWN;
  special added tokens (`<s>`, `</s>`, ...) are CONTROL, non-special ones USER_DEFINED; the rest
  are NORMAL.
* scores: sentencepiece's BPE repeatedly merges the adjacent pair whose concatenation is the piece
  with the highest score (the leftmost one on ties), so only the order of the scores of pieces that
  merges make matters. The JSON keeps that order only in its merges list, in one of two ways:
  - merges sorted by score (mlx_lm convert; transformers 5 for mistral/mixtral checkpoints): a
    piece made by merge rank r gets score -r (the rank of the first merge making it; every merge
    making it makes the same piece, whose score is all sentencepiece reads). Recognized by pieces
    made out of id order: sentencepiece's trainer numbers pieces in score order, and Llama and
    Mistral set every run "▁▁" .. "▁" * 16 apart at score -1e9, so those come last. (Those equal
    scores become consecutive ranks; the ids encode gives are the same, which the tests check.)
  - merges sorted by piece id (transformers 5's LlamaTokenizer): the set-apart scores are lost, so
    pieces get -rank as well, except that runs of "▁" get Llama's and Mistral's -1e9 back.
  Pieces no merge makes (single characters, whose score sentencepiece never reads) come after all
  of them, in id order. BYTE / CONTROL / UNKNOWN / USER_DEFINED pieces score 0, as in the original.
* normalizer: "identity" (no Unicode normalization), whitespace escaped to "▁", no removal of extra
  whitespace, and a dummy "▁" prefix when the JSON prepends one (a `Prepend("▁")` normalizer or a
  `Metaspace` pre-tokenizer whose prepend_scheme is not "never").
* trainer spec: BPE, vocab size, byte_fallback, unk/bos/eos/pad ids and pieces, unk_surface " ⁇ ";
  the remaining options (only read while training) copy Llama's and Mistral's.

The result is the serialized `ModelProto`, written by hand (protobuf wire format) so that neither
protobuf nor tokenizers is a runtime dependency; load it with
`sentencepiece.SentencePieceProcessor(model_proto=...)`. Anything else (byte-level BPE, WordPiece,
Unigram, unknown normalizers, no byte fallback) raises a one-line `MixtralError`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import MixtralError

SPACE = "\u2581"  # "▁", sentencepiece's escaped space
SPACE_RUN_SCORE = -1e9  # Llama's and Mistral's score for every piece "▁▁" .. "▁" * 16

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class UnsupportedTokenizer(ValueError):
    """Why a tokenizer.json cannot be expressed as a SentencePiece BPE model (a MixtralError for users)."""


def model_proto_from_tokenizer_json(path: str | os.PathLike, as_transformers: bool = False) -> bytes:
    """The serialized SentencePiece ModelProto equivalent to the `tokenizer.json` at `path`.

    bos/eos come from `tokenizer_config.json` next to it when that names them, else "<s>"/"</s>".
    `as_transformers`: keep the merge order exactly as the file gives it (Hugging Face's ids for
    whitespace runs) instead of restoring Llama's and Mistral's sentencepiece scores.
    Raises a one-line `MixtralError` (naming `path`) for an unreadable or non-Llama-style file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MixtralError(f"Cannot read tokenizer {path}: {reason}") from None
    config = _read_config(path.parent / "tokenizer_config.json")
    try:
        return build_model_proto(data, bos_token=_token_name(config.get("bos_token")) or "<s>",
                                 eos_token=_token_name(config.get("eos_token")) or "</s>",
                                 as_transformers=as_transformers)
    except UnsupportedTokenizer as error:
        raise MixtralError(f"Tokenizer {path} is not a Llama-style SentencePiece BPE with byte fallback "
                           f"({error}); put the model's tokenizer.model next to it") from None


def build_model_proto(data: dict[str, Any], bos_token: str = "<s>", eos_token: str = "</s>",
                      as_transformers: bool = False) -> bytes:
    """The serialized ModelProto for a parsed `tokenizer.json`; `UnsupportedTokenizer` says why not."""
    if not isinstance(data, dict):
        raise UnsupportedTokenizer("not a JSON object")
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise UnsupportedTokenizer(f"model type {model.get('type') if isinstance(model, dict) else None}, not BPE")
    if not model.get("byte_fallback"):
        raise UnsupportedTokenizer("no byte_fallback")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UnsupportedTokenizer("subword prefix/suffix")
    add_dummy_prefix = _whitespace_handling(data)

    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list) or not all(isinstance(t, dict) for t in added_tokens):
        raise UnsupportedTokenizer("added_tokens is not a list of objects")
    pieces = _pieces_by_id(model, added_tokens)
    ids = {piece: i for i, piece in enumerate(pieces)}
    types = [BYTE if _BYTE_PIECE.fullmatch(piece) else NORMAL for piece in pieces]
    if types.count(BYTE) != 256:
        raise UnsupportedTokenizer(f"{types.count(BYTE)} <0xNN> byte pieces, not 256")
    for token in added_tokens:
        if token.get("content") in ids:
            # as_transformers: text between added tokens only (they are matched before), so none
            # may come out of sentencepiece's own matching of user-defined pieces
            special = token.get("special", True) or as_transformers
            types[ids[token["content"]]] = CONTROL if special else USER_DEFINED
    unk = model.get("unk_token") or "<unk>"
    if unk not in ids:
        raise UnsupportedTokenizer(f"no unknown piece {unk!r}")
    types[ids[unk]] = UNKNOWN
    for name in (bos_token, eos_token):
        if name not in ids:
            raise UnsupportedTokenizer(f"no piece {name!r}")
        types[ids[name]] = CONTROL
    pad_id = ids["<pad>"] if "<pad>" in ids and types[ids["<pad>"]] == CONTROL else -1

    scores = _scores(pieces, ids, types, model.get("merges") or [], as_transformers)
    return _model_proto(pieces, scores, types, add_dummy_prefix, unk=ids[unk], bos=ids[bos_token],
                        eos=ids[eos_token], pad=pad_id)




# --- reading tokenizer.json -----------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _token_name(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _whitespace_handling(data: dict[str, Any]) -> bool:
    """Check spaces become "▁" and nothing else changes the text; return whether "▁" is prepended.

    Accepts the layouts transformers writes for Llama/Mistral: Sequence[Prepend("▁"), Replace(" ",
    "▁")] (legacy), Metaspace("▁", prepend_scheme "first"/"always") (non-legacy), and transformers
    5's Sequence[Replace(" ", "▁"), Replace(/\\A▁/, "▁▁")] + Metaspace("always") (which also always
    prepends one "▁", like sentencepiece's dummy prefix).
    """
    escapes = prepends = False
    for step in _flatten(data.get("normalizer"), "normalizers"):
        kind, pattern = step.get("type"), step.get("pattern") or {}
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prepends = True
        elif kind == "Replace" and pattern.get("String") == " " and step.get("content") == SPACE:
            escapes = True
        elif kind == "Replace" and pattern.get("Regex") == f"\\A{SPACE}" and step.get("content") == SPACE * 2:
            pass  # transformers 5: a leading space stays "▁▁" although Metaspace then prepends nothing
        else:
            raise UnsupportedTokenizer(f"normalizer {kind}")
    for step in _flatten(data.get("pre_tokenizer"), "pretokenizers"):
        if _isolates_literals(step):
            continue
        if step.get("type") != "Metaspace" or step.get("replacement", SPACE) != SPACE:
            raise UnsupportedTokenizer(f"pre-tokenizer {step.get('type')}")
        escapes = True
        scheme = step.get("prepend_scheme")
        prepends |= scheme in ("first", "always") if scheme is not None else bool(step.get("add_prefix_space", True))
    if not escapes:
        raise UnsupportedTokenizer("spaces are not escaped as \u2581")
    return prepends


_LITERAL = re.compile(r"(?:[^\\|()\[\]{}.*+?^$]|\\.)+")


def _isolates_literals(step: dict[str, Any]) -> bool:
    """A Split that only isolates literal names (transformers 5 writes one for Mistral's v3
    tokenizer: "[REFERENCE_DOC_0]" ...). It changes nothing for text that does not contain those
    names, so the sentencepiece model ignores it (text that does would split there in transformers)."""
    pattern = (step.get("pattern") or {}).get("Regex")
    return (step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert")
            and isinstance(pattern, str) and all(_LITERAL.fullmatch(part) for part in pattern.split("|")))


def _flatten(step: Any, key: str) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer as a flat list of steps (None is none, Sequence is its items)."""
    if step is None:
        return []
    if not isinstance(step, dict):
        raise UnsupportedTokenizer(f"{key} entry {step!r}")
    if step.get("type") == "Sequence":
        return [s for inner in step.get(key) or [] for s in _flatten(inner, key)]
    return [step]


def _pieces_by_id(model: dict[str, Any], added_tokens: list[dict[str, Any]]) -> list[str]:
    """Every piece (vocab plus added tokens) in id order; ids must run 0..n-1 without gaps."""
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise UnsupportedTokenizer("no vocab")
    by_id: dict[int, str] = {}
    for piece, i in [*vocab.items(), *((t.get("content"), t.get("id")) for t in added_tokens)]:
        if not isinstance(piece, str) or not isinstance(i, int) or by_id.get(i, piece) != piece:
            raise UnsupportedTokenizer(f"conflicting vocab entry {piece!r}: {i!r}")
        by_id[i] = piece
    if sorted(by_id) != list(range(len(by_id))):
        raise UnsupportedTokenizer("vocab ids are not 0..n-1")
    pieces = [by_id[i] for i in range(len(by_id))]
    if len(set(pieces)) != len(pieces):
        raise UnsupportedTokenizer("a piece has two ids")
    return pieces


def _scores(pieces: list[str], ids: dict[str, int], types: list[int], merges: list[Any],
            as_transformers: bool = False) -> list[float]:
    """Piece scores from the merge order (see the module docstring); 0 for all but NORMAL pieces."""
    if not isinstance(merges, list):
        raise UnsupportedTokenizer("merges is not a list")
    first_rank: dict[int, int] = {}  # piece id -> rank of the first merge that makes it
    for rank, merge in enumerate(merges):
        try:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge  # str: tokenizers < 0.20
            made = ids.get(left + right)
        except (TypeError, ValueError, AttributeError):
            made = left = right = None
        if made is None or left not in ids or right not in ids:
            raise UnsupportedTokenizer(f"merge {merge!r} of pieces not in the vocab")
        if made not in first_rank:
            first_rank[made] = rank
    made_in_order = sorted(first_rank, key=first_rank.__getitem__)
    by_score = any(a > b for a, b in zip(made_in_order, made_in_order[1:]))
    scores = [0.0] * len(pieces)
    for i, kind in enumerate(types):
        if kind != NORMAL:
            continue
        if i not in first_rank:  # a single character: its score is never read
            scores[i] = -float(len(merges) + i)
        elif by_score or as_transformers or not _is_space_run(pieces[i]):
            scores[i] = -float(first_rank[i])
        else:  # merges in id order: restore Llama's and Mistral's runs of "▁", last and tied
            scores[i] = SPACE_RUN_SCORE
    return scores


def _is_space_run(piece: str) -> bool:
    return len(piece) > 1 and piece.strip(SPACE) == ""


# --- writing the ModelProto (protobuf wire format) ------------------------------------------------


def _model_proto(pieces: list[str], scores: list[float], types: list[int], add_dummy_prefix: bool,
                 unk: int, bos: int, eos: int, pad: int) -> bytes:
    out = bytearray()
    pack_float = struct.Struct("<f").pack
    for piece, score, kind in zip(pieces, scores, types):  # ModelProto.pieces = 1 (the hot loop: inlined)
        text = piece.encode("utf-8")
        # SentencePiece: piece = 1 (string, key 0x0A), score = 2 (float, key 0x15), type = 3 (enum, key 0x18)
        body = b"\x0a" + _varint(len(text)) + text + b"\x15" + pack_float(score) + b"\x18" + _varint(kind)
        out += b"\x0a" + _varint(len(body)) + body
    trainer = b"".join([  # ModelProto.trainer_spec = 2
        _varint_field(3, 2),  # model_type: BPE
        _varint_field(4, len(pieces)),  # vocab_size
        _float(10, 0.99995),  # character_coverage
        _varint_field(20, 16),  # max_sentencepiece_length
        _varint_field(21, 1), _varint_field(22, 1), _varint_field(23, 1),  # split_by_unicode_script/whitespace/number
        _varint_field(24, 0),  # treat_whitespace_as_suffix
        _varint_field(25, 1),  # split_digits
        _varint_field(26, 1),  # allow_whitespace_only_pieces
        _varint_field(32, 1),  # vocabulary_output_piece_score
        _varint_field(35, 1),  # byte_fallback
        _varint_field(40, unk), _varint_field(41, bos), _varint_field(42, eos), _varint_field(43, pad),
        _string(44, " \u2047 "),  # unk_surface " ⁇ "
        _string(45, pieces[unk]), _string(46, pieces[bos]), _string(47, pieces[eos]),
        _string(48, pieces[pad] if pad >= 0 else "<pad>"),
    ])
    out += _message(2, trainer)
    normalizer = b"".join([  # ModelProto.normalizer_spec = 3
        _string(1, "identity"),  # name
        _bytes(2, b""),  # precompiled_charsmap: none, so no Unicode normalization
        _varint_field(3, int(add_dummy_prefix)),
        _varint_field(4, 0),  # remove_extra_whitespaces
        _varint_field(5, 1),  # escape_whitespaces
    ])
    out += _message(3, normalizer)
    return bytes(out)


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]
    value &= (1 << 64) - 1  # negative int32/int64 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:  # int32, enum, bool
    return _key(field, 0) + _varint(value)


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _string(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _message(field: int, body: bytes) -> bytes:
    return _bytes(field, body)
