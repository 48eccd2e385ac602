"""Tokenizer and streaming detokenizer on the real Mixtral v1 tokenizer.model.

The streaming detokenizer's contract: what it emits, joined, is exactly `decode(all ids)` for any
id stream, and text comes out as soon as it is final (never half a UTF-8 character).
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mixtral.errors import MixtralError
from mlx_mixtral.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand \r\n CRLF",
    "               many spaces",
    "[INST] literal markers [/INST] </s> <s> <unk>",
    "你好，世界！这是一个测试。",
    "こんにちは世界 안녕하세요",
    "emoji 🙂👍🏽🧑‍🚀🏳️‍🌈 and combining e\u0301",
    "RTL עברית العربية",
    "▁ the sentencepiece space symbol",
    "",
]

BYTE_FIRST, BYTE_LAST = 3, 258  # <0x00> .. <0xFF>
SPACE_PIECE = 28705  # "▁"


@pytest.fixture(scope="module")
def sp(tokenizer_model_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model_path))


def lossless(text: str) -> str:
    """What decode(encode(text)) gives: sentencepiece reads a literal "▁" in text as a space."""
    return text.replace("▁", " ")


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Every piece of text the detokenizer emits for `ids`, the finalize() flush last."""
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add_token(i) for i in ids]
    pieces.append(detokenizer.finalize())
    assert detokenizer.text == "".join(pieces)
    assert detokenizer.tokens == ids
    return pieces


# --- Tokenizer -----------------------------------------------------------------------------------


def test_special_ids(tokenizer: Tokenizer, tokenizer_model_path: Path) -> None:
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.model_file == tokenizer_model_path


@pytest.fixture(scope="module")
def reference(tokenizer_model_path: Path):
    """mistral-common's own sentencepiece wrapper, the one its chat encoding uses."""
    return MistralTokenizer.from_file(str(tokenizer_model_path)).instruct_tokenizer.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_mistral_common_and_round_trips(tokenizer, reference, text: str) -> None:
    """Message text (`encode_text`) is mistral-common's always; a raw prompt (`encode`) too unless
    it writes control tokens, which a raw prompt means as the ids themselves."""
    assert tokenizer.encode_text(text) == reference.encode(text, bos=False, eos=False)
    assert tokenizer.decode(tokenizer.encode_text(text)) == lossless(text)
    if not any(marker in text for marker in ("<s>", "</s>", "<unk>")):
        assert tokenizer.encode(text) == reference.encode(text, bos=True, eos=False)
        assert tokenizer.encode(text, bos=False) == reference.encode(text, bos=False, eos=False)


def test_raw_prompts_turn_written_control_tokens_into_ids(tokenizer, reference) -> None:
    assert tokenizer.encode("a</s><s>b") == [1, *reference.encode("a", bos=False, eos=False), 2, 1,
                                             *reference.encode("b", bos=False, eos=False)]
    assert 2 not in tokenizer.encode_text("a</s>b")


def test_decode_is_sentencepiece_decode(tokenizer: Tokenizer, sp) -> None:
    assert tokenizer.decode([1, 2]) == ""  # BOS / EOS are invisible
    assert tokenizer.decode([0]) == " ⁇ "  # <unk>
    assert tokenizer.decode([BYTE_FIRST + 0xE4, BYTE_FIRST + 0x41]) == "\ufffdA"  # broken UTF-8
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(32000) for _ in range(rng.randint(0, 30))]
        assert tokenizer.decode(ids) == sp.decode(ids)


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MixtralError, match="not found") as caught:
        Tokenizer(tmp_path / "nope.model")
    assert str(tmp_path / "nope.model") in str(caught.value) and "\n" not in str(caught.value)


def test_unreadable_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model\n\x00\x01")
    with pytest.raises(MixtralError) as caught:
        Tokenizer(bad)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_from_folder(tmp_path: Path, tokenizer_model_path: Path) -> None:
    with pytest.raises(MixtralError) as caught:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)
    shutil.copy(tokenizer_model_path, tmp_path / "tokenizer.model")
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.model_file == tmp_path / "tokenizer.model"
    assert loaded.encode("Hello") == [1, 22557]


# --- Streaming detokenizer ------------------------------------------------------------------------


def random_ids(rng: random.Random, kind: str) -> list[int]:
    n = rng.randint(0, 60)
    if kind == "uniform":
        return [rng.randrange(32000) for _ in range(n)]
    if kind == "bytes":
        return [rng.randint(BYTE_FIRST, BYTE_LAST) for _ in range(n)]
    if kind == "utf8-bytes":  # byte ids biased towards lead and continuation bytes
        return [BYTE_FIRST + rng.choice([0x41, 0x80, 0x9F, 0xBF, 0xC3, 0xE4, 0xED, 0xF0, 0xF4, 0xF8]) for _ in range(n)]
    # "mixed": control tokens, <unk>, "▁", bytes and normal pieces, to hit the start-of-text rule
    pool = [0, 1, 2, SPACE_PIECE, 259, 22557, 28747]
    return [rng.choice(pool) if rng.random() < 0.6 else rng.randint(BYTE_FIRST, BYTE_LAST) for _ in range(n)]


@pytest.mark.parametrize("kind", ["uniform", "bytes", "utf8-bytes", "mixed"])
def test_stream_joins_to_decode_on_random_ids(tokenizer: Tokenizer, kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(300):
        ids = random_ids(rng, kind)
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_stream_joins_to_decode_on_all_short_byte_sequences(tokenizer: Tokenizer) -> None:
    """Every 1-3 byte sequence over bytes of each UTF-8 class, at the start and mid-text."""
    classes = [0x00, 0x41, 0x80, 0xBF, 0xC0, 0xC3, 0xE0, 0xE4, 0xED, 0xF0, 0xF4, 0xF8, 0xFF]
    for length in (1, 2, 3):
        for sequence in itertools.product(classes, repeat=length):
            byte_ids = [BYTE_FIRST + b for b in sequence]
            for before, after in (([], []), ([1], [SPACE_PIECE]), ([22557], [2]), ([SPACE_PIECE], byte_ids)):
                ids = before + byte_ids + after
                assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_encoded_text_is_incremental(tokenizer: Tokenizer, text: str) -> None:
    """After each id, the text emitted so far is the decoded prefix as soon as that has no broken character."""
    ids = [tokenizer.bos_id, *tokenizer.encode_text(text)]
    detokenizer = tokenizer.detokenizer()
    for n, token in enumerate(ids, start=1):
        detokenizer.add_token(token)
        decoded = tokenizer.decode(ids[:n])
        assert "\ufffd" not in detokenizer.text  # never half a character
        if "\ufffd" not in decoded:
            assert detokenizer.text == decoded
        else:
            assert decoded.startswith(detokenizer.text)
    assert detokenizer.finalize() == ""
    assert detokenizer.text == lossless(text)


def test_cjk_and_emoji_use_byte_fallback(tokenizer: Tokenizer, sp) -> None:
    """Guard for the test above: its texts really contain byte pieces."""
    assert any(sp.IsByte(i) for i in tokenizer.encode("🧑‍🚀🏳️‍🌈"))


def test_words_are_emitted_before_finalize(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Streaming shows words while they are generated")
    pieces = stream(tokenizer, ids)
    assert pieces[0] == ""  # BOS
    assert all(pieces[1:-1]) and pieces[-1] == ""
    assert pieces[1] == "Stream"  # the first piece's "▁" is dropped, as decode does
    assert pieces[2:4] == ["ing", " shows"]


def test_leading_space_rule_after_control_ids(tokenizer: Tokenizer) -> None:
    """Only control ids keep the text "at its start": a second "▁" is a real space."""
    for ids in ([1, 1, SPACE_PIECE, SPACE_PIECE, 22557], [2, SPACE_PIECE, 1, 22557], [0, SPACE_PIECE]):
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_stream_decodes_only_a_bounded_window(tokenizer: Tokenizer, monkeypatch) -> None:
    """Linear time: the whole sequence is never re-decoded, whatever its length."""
    rng = random.Random(1)
    ids = [rng.choice([rng.randrange(32000), rng.randint(BYTE_FIRST, BYTE_LAST)]) for _ in range(3000)]
    lengths = []
    original = spm.SentencePieceProcessor.decode

    def recording_decode(self, input, *args, **kwargs):
        lengths.append(len(input))
        return original(self, input, *args, **kwargs)

    monkeypatch.setattr(spm.SentencePieceProcessor, "decode", recording_decode)
    text = "".join(stream(tokenizer, ids))
    assert max(lengths) <= 5  # context piece + at most 3 pending bytes + the new id
    assert len(lengths) <= len(ids) + 1
    monkeypatch.undo()
    assert text == tokenizer.decode(ids)
