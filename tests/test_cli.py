"""`mlx-mixtral generate` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mlx_mixtral


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_path(hf_checkpoint_factory):
    return hf_checkpoint_factory("gqa")


@pytest.fixture(scope="module")
def reference(model_path):
    """What the Python API generates greedily, with the chat template and without it."""
    model, tokenizer = mlx_mixtral.load(model_path, progress=False)

    def run(tokens):
        return mlx_mixtral.generate(model, tokenizer, tokens, max_tokens=12)

    chat = run(tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello there"}]))
    return {"chat": chat, "raw": run(tokenizer.encode("Hello there"))}


def test_generate_streams_the_chat_answer(model_path, reference):
    r = _cli("generate", "--model", str(model_path), "--prompt", "Hello there", "--system", "Be brief.",
             "--max-tokens", "12", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference["chat"] + "\n"
    assert "tok/s" in r.stderr and "peak memory" in r.stderr


def test_generate_raw_from_stdin(model_path, reference):
    r = _cli("generate", "--model", str(model_path), "--raw", "--max-tokens", "12", stdin="Hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference["raw"] + "\n"


@pytest.mark.parametrize("piped", ["Hello there\n", "Hello there\r\n", "Hello there"])
def test_piped_prompt_equals_the_same_prompt_given_as_a_flag(model_path, reference, piped):
    """`echo q | mlx-mixtral generate` sends "q\n": the newline that ends the input is not prompt."""
    r = _cli("generate", "--model", str(model_path), "--raw", "--max-tokens", "12", stdin=piped)
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference["raw"] + "\n"


@pytest.mark.parametrize("piped, prompt", [("q\n", "q"), ("q\r\n", "q"), ("q", "q"), ("q\n\n", "q\n"),
                                           ("a\nb\n", "a\nb"), (" q \n", " q ")])
def test_only_the_final_newline_of_stdin_is_dropped(monkeypatch, piped, prompt):
    import io
    from argparse import Namespace

    from mlx_mixtral.cli import _read_prompt

    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    assert _read_prompt(Namespace(prompt=None)) == prompt


def test_sampling_flags_and_seed_repeat(model_path):
    args = ("generate", "--model", str(model_path), "-p", "Hi", "--max-tokens", "10", "--temp", "0.9",
            "--top-p", "0.95", "--top-k", "50", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model", "-p", "hi"], "no such folder"),
    (["--model", "{model}", "-p", "hi", "--temp", "-1"], "temperature"),
    (["--model", "/nonexistent/model", "-p", "hi", "--seed", "-1"], "seed"),
    (["--model", "/nonexistent/model", "-p", "hi", "--max-tokens", "0"], "max_tokens"),
    (["--model", "{model}", "-p", "hi " * 600], "does not fit the context"),
])
def test_errors_are_one_line(model_path, args, needle):
    r = _cli("generate", *[a.replace("{model}", str(model_path)) for a in args])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in r.stderr
