"""The family's formats at every front door: `generate`, `chat`, `cache-prompt`, `serve`, `convert`.

Each model folder is the tiny gqa checkpoint with another member's real tokenizer files beside it
(`tokenizer_folders`): the weights do not matter to which prompt is built, only the files do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_mixtral
from mlx_mixtral.tokenizer import BASE_MODEL_NOTE, Tokenizer

import tokenizer_folders as folders

TOKENIZER_FILES = folders.TOKENIZER_FILES


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLX_MIXTRAL_HISTORY": "", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def member(hf_checkpoint_factory, tmp_path_factory):
    """`member(builder, name)`: the gqa weights with a family member's tokenizer files."""
    source = hf_checkpoint_factory("gqa")
    made: dict[str, Path] = {}

    def build(builder, name: str, *args) -> Path:
        if name not in made:
            made[name] = folders.with_weights(source, tmp_path_factory.mktemp("member") / name, builder, *args)
        return made[name]

    return build


@pytest.mark.parametrize("builder, args, name", [
    (folders.instruct_v1, (), "Mistral v1 ([INST] text)"),
    (folders.instruct_v3, (), "Mistral v3 (control tokens)"),
    (folders.chatml, ("model",), "chat template from tokenizer_config.json"),
    (folders.chatml, ("json",), "chat template from chat_template.jinja"),
    (folders.base, (), "none (base model)"),
])
def test_generate_says_which_format_and_uses_it(member, builder, args, name):
    folder = member(builder, builder.__name__ + "-".join(args), *args)
    r = _cli("generate", "--model", str(folder), "--prompt", "Hello there", "--max-tokens", "6", "--verbose")
    assert r.returncode == 0, r.stderr
    assert f"chat format: {name}" in r.stderr
    assert (BASE_MODEL_NOTE in r.stderr) == (builder is folders.base)
    model, tokenizer = mlx_mixtral.load(folder, progress=False)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    assert r.stdout == mlx_mixtral.generate(model, tokenizer, ids, max_tokens=6) + "\n"


def test_a_base_model_chat_is_the_raw_prompt(member):
    folder = member(folders.base, "base")
    chat = _cli("generate", "--model", str(folder), "--prompt", "Once upon a time", "--max-tokens", "8")
    raw = _cli("generate", "--model", str(folder), "--prompt", "Once upon a time", "--max-tokens", "8", "--raw")
    assert chat.returncode == raw.returncode == 0 and chat.stdout == raw.stdout
    assert BASE_MODEL_NOTE in chat.stderr and BASE_MODEL_NOTE not in raw.stderr


def test_chat_banner_and_show_name_the_format(member, tmp_path):
    folder = member(folders.chatml, "chatml-model", "model")
    r = _cli("chat", "--model", str(folder), "--max-tokens", "4",
             stdin="hi\n/show\n/save " + str(tmp_path / "c.json") + "\n/exit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "chat format: chat template from tokenizer_config.json" in out  # the banner
    assert re.search(r"chat format +chat template from tokenizer_config\.json", out)  # /show
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["chat_format"] == Tokenizer.from_folder(folder).chat_format.fingerprint


def test_a_prompt_cache_from_another_template_is_refused(member, tmp_path):
    folder = member(folders.chatml, "chatml-cache", "model")
    (tmp_path / "doc.txt").write_text("A long document about tokenizers.")
    cache = tmp_path / "doc.kv"
    r = _cli("cache-prompt", "--model", str(folder), "--prompt-file", str(tmp_path / "doc.txt"), "--out", str(cache),
             "--chat")
    assert r.returncode == 0, r.stderr
    assert "chat format: chat template from tokenizer_config.json" in r.stderr
    ok = _cli("generate", "--model", str(folder), "--prompt-cache", str(cache), "--prompt", " Summarise.",
              "--max-tokens", "3")
    assert ok.returncode == 0, ok.stderr
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] += "{# another revision of the template #}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        refused = _cli("generate", "--model", str(folder), "--prompt-cache", str(cache), "--prompt", " Summarise.",
                       "--max-tokens", "3")
    finally:
        config["chat_template"] = folders.CHATML_TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "another chat format" in lines[0] and str(cache) in lines[0]


def test_serve_reports_its_format(member):
    from served import NAME, Server

    folder = member(folders.instruct_v3, "v3")
    server = Server(folder)
    try:
        assert server.health()["chat_format"] == "Mistral v3 (control tokens)"
        assert any("chat format: Mistral v3 (control tokens)" in line for line in server.log)
        reply = server.post("/v1/chat/completions", {"model": NAME, "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "Hello"}]})
        assert reply.status == 200
        assert reply.json()["usage"]["prompt_tokens"] == 4  # [BOS, [INST], Hello, [/INST]]
    finally:
        server.stop()


def test_convert_keeps_every_tokenizer_file(hf_checkpoint_factory, tmp_path):
    """A ChatML fine-tune as transformers 5 saves it (template in chat_template.jinja) converts
    with its template: we, transformers and mlx-lm render the same ids from the output."""
    from transformers import AutoTokenizer

    from convert.__main__ import main

    source = tmp_path / "source"
    shutil.copytree(hf_checkpoint_factory("gqa"), source)
    for name in TOKENIZER_FILES:
        (source / name).unlink(missing_ok=True)
    tokenizer_dir = folders.chatml(tmp_path / "tok", "json")
    for path in tokenizer_dir.iterdir():
        if path.name != "config.json":
            shutil.copyfile(path, source / path.name)
    (source / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000, "<|im_start|>": 32001}))
    out = tmp_path / "out"
    assert main(["--hf-path", str(source), "--mlx-path", str(out), "-q"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "added_tokens.json",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there"}]
    ours = Tokenizer.from_folder(out).apply_chat_template(messages)
    assert ours == Tokenizer.from_folder(source).apply_chat_template(messages)
    hf = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ours == list(hf["input_ids"] if not isinstance(hf, list) else hf)
    from mlx_lm.utils import load_tokenizer

    wrapper = load_tokenizer(out)
    assert wrapper.apply_chat_template(messages, add_generation_prompt=True) == ours


@pytest.mark.parametrize("builder, args", [(folders.chatml, ("model",)), (folders.instruct_v3, ())])
def test_mlx_lm_4bit_folders_keep_their_format(member, mlx_lm_converted, builder, args):
    """mlx-community folders are mlx-lm conversions: the same format, the same ids as the source."""
    source = member(builder, "mlxlm-" + builder.__name__, *args)
    out = mlx_lm_converted(source, quantize=True)
    ours, theirs = Tokenizer.from_folder(out), Tokenizer.from_folder(source)
    assert ours.chat_format.kind == theirs.chat_format.kind != "none"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello  there"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages)
    assert ours.eos_token_ids == theirs.eos_token_ids
    r = _cli("generate", "--model", str(out), "--prompt", "Hello", "--max-tokens", "4", "--verbose")
    assert r.returncode == 0 and f"chat format: {theirs.chat_format.name.split(' from ')[0]}" in r.stderr, r.stderr
