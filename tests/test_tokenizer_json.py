"""A folder with only tokenizer.json (what `mlx_lm convert` writes with transformers 5) tokenizes
exactly like the real Mixtral tokenizer.model: the sentencepiece model rebuilt from the JSON
(`mlx_mixtral.tokenizer.sentencepiece_json`) must give the same ids, pieces and decoded text.

The tokenizer.json files are the ones users get, both made by transformers 5 from the real
tokenizer.model: `mlx_lm convert` of a tiny Mixtral checkpoint (the shared conftest fixtures; its
merges are sorted by piece score) and `LlamaTokenizer.save_pretrained` (a checkpoint whose
model_type is "llama"; merges sorted by piece id, which loses Mistral's -1e9 whitespace scores).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import mistral_common
import pytest
import sentencepiece as spm

import mlx_mixtral
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.tokenizer import Tokenizer
from mlx_mixtral.tokenizer.sentencepiece_json import build_model_proto

from checkpoints import PROBE_TOKENS, TOKENIZER_CONFIG

REAL_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. Once upon a time",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "   ",
    "tabs\tand\nnewlines\n\n\nand \r\n CRLF",
    "               many spaces" + " " * 33 + "x" + " " * 17,
    "[INST] What is 2+2? [/INST] 4</s>",
    "<s>", "</s>", "<unk>", "[INST]", "<s>[INST] hi [/INST]",
    "1234567890 3.14159 1,000,000 0x7F 2024-01-01",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # comment\n\tpass\n",
    "    indented    code\n        deeper",
    "你好，世界！这是一个测试。",
    "こんにちは世界 안녕하세요 Привет мир Ελληνικά",
    "emoji 🙂👍🏽🧑‍🚀🏳️‍🌈 and combining e\u0301 and \u00e9",
    "RTL עברית العربية हिन्दी ไทย",
    "rare chars: \U0001d54f \u2603 \ufffd \u0000 \u200b \ufeff",
    "▁ the sentencepiece space symbol ▁▁",
    "<0x41> looks like a byte piece",
]


@pytest.fixture(scope="module")
def mlx_lm_folder(hf_checkpoint_factory, mlx_lm_converted) -> Path:
    folder = mlx_lm_converted(hf_checkpoint_factory("gqa"))
    assert (folder / "tokenizer.json").is_file()
    return folder


@pytest.fixture(scope="module", params=["mlx_lm", "llama"])
def json_folder(request, tmp_path_factory) -> Path:
    """A folder with tokenizer.json and tokenizer_config.json only (never tokenizer.model)."""
    folder = tmp_path_factory.mktemp(f"tokenizer_json_{request.param}")
    if request.param == "mlx_lm":
        source = request.getfixturevalue("mlx_lm_folder")
    else:
        from transformers import AutoTokenizer

        source = tmp_path_factory.mktemp("llama_checkpoint")
        shutil.copy(REAL_MODEL, source / "tokenizer.model")
        (source / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
        AutoTokenizer.from_pretrained(source).save_pretrained(source / "saved")
        source = source / "saved"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    merges = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert list(merges[0]) == (["▁", "t"] if request.param == "mlx_lm" else ["▁", "▁"])  # what each covers
    return folder


@pytest.fixture(scope="module")
def rebuilt(json_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(json_folder)


@pytest.fixture(scope="module")
def real() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(REAL_MODEL))


def test_from_folder_uses_tokenizer_json(rebuilt: Tokenizer, json_folder: Path, real) -> None:
    assert not (json_folder / "tokenizer.model").exists()
    assert rebuilt.model_file == json_folder / "tokenizer.json"
    assert (rebuilt.vocab_size, rebuilt.bos_id, rebuilt.eos_id) == (real.vocab_size(), real.bos_id(), real.eos_id())
    assert (rebuilt.vocab_size, rebuilt.bos_id, rebuilt.eos_id, rebuilt.eos_token_ids) == (32000, 1, 2, {2})
    assert (rebuilt._sp.unk_id(), rebuilt._sp.pad_id()) == (real.unk_id(), real.pad_id())


def test_every_piece_and_type_is_the_real_ones(rebuilt: Tokenizer, real) -> None:
    sp = rebuilt._sp
    for i in range(real.vocab_size()):
        assert sp.id_to_piece(i) == real.id_to_piece(i), i
        kinds = (sp.IsControl(i), sp.IsUnknown(i), sp.IsByte(i), sp.IsUnused(i))
        assert kinds == (real.IsControl(i), real.IsUnknown(i), real.IsByte(i), real.IsUnused(i)), i


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_the_real_model(rebuilt: Tokenizer, real, text: str) -> None:
    ids = real.encode(text)
    assert rebuilt.encode_text(text) == ids
    assert rebuilt.decode(ids) == real.decode(ids)
    assert rebuilt.decode([1, *ids, 2]) == real.decode([1, *ids, 2])


def test_whitespace_runs(rebuilt: Tokenizer, real) -> None:
    """Mistral gives every run of "▁" the same score (-1e9); the JSON's merge order must still agree."""
    for n in range(1, 70):
        for before in ("", "a", "the", "\n", "("):
            for after in ("", "x", "the", "\n", " a", "\t"):
                text = before + " " * n + after
                assert rebuilt.encode_text(text) == real.encode(text), repr(text)


def test_random_strings(rebuilt: Tokenizer, real) -> None:
    rng = random.Random(1234)
    alphabet = ([chr(c) for c in range(32, 0x3000)] + [" "] * 200 + list("0123456789") * 20
                + ["\n", "\t", "\r", "\u2581", "😀", "🏳️‍🌈", "\x00", "<s>", "</s>", "[INST]", "the", "ing"])
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert rebuilt.encode_text(text) == real.encode(text), repr(text)
    for _ in range(200):  # any code point (lone surrogates aside): mostly byte fallback
        text = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 12)))
        text = text.encode("utf-8", "replace").decode("utf-8")
        assert rebuilt.encode_text(text) == real.encode(text), repr(text)


def test_decode_random_ids(rebuilt: Tokenizer, real) -> None:
    rng = random.Random(99)
    for _ in range(300):
        ids = [rng.randrange(32000) for _ in range(rng.randint(0, 30))]
        assert rebuilt.decode(ids) == real.decode(ids)
    assert rebuilt.decode([0]) == " ⁇ "
    assert rebuilt.decode([3 + 0xE4, 3 + 0x41]) == "\ufffdA"


def test_streaming_detokenizer(rebuilt: Tokenizer, real) -> None:
    ids = real.encode("emoji 🙂👍🏽 你好 and spaces   done")
    detokenizer = rebuilt.detokenizer()
    text = "".join(detokenizer.add_token(i) for i in ids) + detokenizer.finalize()
    assert text == real.decode(ids)


def test_chat_template(rebuilt: Tokenizer) -> None:
    real_tokenizer = Tokenizer(REAL_MODEL)
    messages = [{"role": "user", "content": "Hi  there!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "[INST] 你好 </s>"}]
    assert rebuilt.apply_chat_template(messages) == real_tokenizer.apply_chat_template(messages)


def test_save_model_writes_a_tokenizer_model(rebuilt: Tokenizer, real, tmp_path: Path) -> None:
    rebuilt.save_model(tmp_path / "tokenizer.model")
    again = Tokenizer.from_folder(tmp_path)
    assert again.model_file == tmp_path / "tokenizer.model"
    for text in TEXTS:
        assert again.encode_text(text) == real.encode(text)


def test_mlx_mixtral_load_mlx_lm_folder(mlx_lm_folder: Path) -> None:
    model, tokenizer = mlx_mixtral.load(mlx_lm_folder, progress=False)
    assert tokenizer.model_file.name == ("tokenizer.model" if (mlx_lm_folder / "tokenizer.model").is_file()
                                         else "tokenizer.json")
    assert tokenizer.encode("The quick brown fox jumps over the lazy dog. Once upon a time") == PROBE_TOKENS


def _tiny_tokenizer_json() -> dict:
    """A minimal Llama-style tokenizer.json in transformers 5's layout (fast to write and read)."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁a", "ab", "▁ab", "▁", "a", "b"]
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": p, "special": True, "normalized": False}
                         for i, p in enumerate(pieces[:3])],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            {"type": "Replace", "pattern": {"Regex": "\\A▁"}, "content": "▁▁"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}]},
        "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": True, "fuse_unk": True,
                  "vocab": {p: i for i, p in enumerate(pieces)},
                  "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"]]},
    }


def test_tiny_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer_json()), encoding="utf-8")
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer._sp.encode("ab ab b", out_type=str) == ["▁ab", "▁ab", "▁", "b"]
    assert tokenizer.encode("ba\u00e9") == [1, 262, 264, 263, 3 + 0xC3, 3 + 0xA9]  # ▁ b a, é as bytes
    assert tokenizer.decode(tokenizer.encode(" ab  é")) == " ab  é"


def test_older_transformers_layouts_give_the_same_model() -> None:
    data = _tiny_tokenizer_json()
    expected = build_model_proto(data)
    legacy = dict(data, pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [  # transformers 4, legacy
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
    legacy["model"] = dict(data["model"], merges=[" ".join(m) for m in data["model"]["merges"]])  # tokenizers < 0.20
    assert build_model_proto(legacy) == expected
    metaspace = dict(data, normalizer=None, pre_tokenizer={  # transformers 4, legacy=False
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False})
    assert build_model_proto(metaspace) == expected
    old_metaspace = dict(metaspace, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "add_prefix_space": True})
    assert build_model_proto(old_metaspace) == expected
    never = dict(metaspace, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"})
    sp = spm.SentencePieceProcessor(model_proto=build_model_proto(never))
    assert sp.encode("ab ab", out_type=str) == ["ab", "▁ab"]


def _broken(how: str) -> dict:
    data = _tiny_tokenizer_json()
    model = data["model"]
    if how == "wordpiece":
        model["type"] = "WordPiece"
    elif how == "no_byte_fallback":
        model["byte_fallback"] = False
    elif how == "byte_level":
        data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    elif how == "nfkc":
        data["normalizer"] = {"type": "NFKC"}
    elif how == "no_space_escape":
        data["normalizer"] = data["pre_tokenizer"] = None
    elif how == "no_byte_pieces":
        model["vocab"] = {p.replace("<0x", "<byte"): i for p, i in model["vocab"].items()}
    elif how == "bad_merge":
        model["merges"] = [["no such", "piece"]]
    elif how == "gap_in_ids":
        model["vocab"] = dict(model["vocab"], extra=10_000)
    elif how == "no_unk":
        model["unk_token"] = "<nope>"
    elif how == "bad_added_tokens":
        data["added_tokens"] = "<s>"
    return data


@pytest.mark.parametrize("how", ["wordpiece", "no_byte_fallback", "byte_level", "nfkc", "no_space_escape",
                                 "no_byte_pieces", "bad_merge", "gap_in_ids", "no_unk", "bad_added_tokens", "not_json",
                                 "list"])
def test_unsupported_tokenizer_json_is_a_one_line_error(tmp_path: Path, how: str) -> None:
    path = tmp_path / "tokenizer.json"
    if how == "not_json":
        path.write_text("{ this is not json", encoding="utf-8")
    elif how == "list":
        path.write_text("[]", encoding="utf-8")
    else:
        path.write_text(json.dumps(_broken(how)), encoding="utf-8")
    with pytest.raises(MixtralError) as caught:
        Tokenizer.from_folder(tmp_path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_folder_without_any_tokenizer_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MixtralError) as caught:
        Tokenizer.from_folder(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "\n" not in message
    with pytest.raises(MixtralError, match="not found"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
