"""`mlx-mixtral generate` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pexpect
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


def _raw(model_path, *args: str) -> list[str]:
    return ["generate", "--model", str(model_path), "--raw", "-p", "Hello there", *args]


def test_stop_strings_on_the_command_line(model_path):
    full = _cli(*_raw(model_path, "--max-tokens", "24")).stdout.removesuffix("\n")
    later, earlier = full[len(full) * 2 // 3:][:4], full[len(full) // 3:][:3]
    assert full.index(earlier) < full.index(later)
    cut = _cli(*_raw(model_path, "--max-tokens", "24", "--stop", later, "--stop", earlier))
    assert cut.returncode == 0 and cut.stdout == full[:full.index(earlier)] + "\n"
    # a stop string whose start ends the reply is held back, then flushed when max_tokens ends it
    held = _cli(*_raw(model_path, "--max-tokens", "24", "--stop", full[-2:] + "\u2603never"))
    assert held.returncode == 0 and held.stdout == full + "\n"


def test_a_held_back_stop_prefix_is_flushed_at_eos(hf_checkpoint_factory):
    model, tokenizer = mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)
    prompt = tokenizer.encode("Hello there")
    free = list(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=10, stop_on_eos=False))
    text = "".join(r.text for r in free[:6])
    tokenizer.eos_token_ids = {free[6].token}  # the 7th token ends the reply
    try:
        out = list(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=10, stop=[text[-2:] + "\u2603"]))
    finally:
        tokenizer.eos_token_ids = {tokenizer.eos_id}
    if free[6].token in [r.token for r in free[:6]]:
        pytest.skip("the EOS stand-in appears earlier in this reply")
    assert "".join(r.text for r in out) == text and out[-1].finish_reason == "stop"


def test_dash_p_dash_reads_stdin(model_path, reference):
    r = _cli("generate", "--model", str(model_path), "--raw", "-p", "-", "--max-tokens", "12", stdin="Hello there\n")
    assert r.returncode == 0 and r.stdout == reference["raw"] + "\n"


def test_no_prompt_at_a_terminal_is_one_line(model_path):
    child = pexpect.spawn(sys.executable, ["-m", "mlx_mixtral.cli", "generate", "--model", str(model_path)],
                          encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert child.before.strip() == "error: no prompt: pass --prompt TEXT, or pipe the prompt into stdin"


def test_ctrl_c_mid_generation_exits_130_with_one_line(model_path):
    # a suite started in the background (`nohup`, `cmd &`) has SIGINT ignored, which a child would
    # inherit: give it the default disposition, as a terminal's shell does
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mixtral.cli", *_raw(model_path, "--max-tokens", "400")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.read(1)  # generation has begun
        os.kill(proc.pid, signal.SIGSTOP)  # so it cannot finish first, however fast the machine
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == "interrupted\n"


def test_a_closed_pipe_ends_quietly(model_path, tmp_path):
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mlx_mixtral.cli", *_raw(model_path, "--max-tokens", "300")])
    done = subprocess.run(["bash", "-c", f"{cmd} 2>err | head -c 3; echo; echo ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.stdout.splitlines()[-1] == "0"  # generate's own exit status
    assert (tmp_path / "err").read_text() == ""  # no traceback, no "Exception ignored"


def test_an_unexpected_error_is_one_line_unless_debugging(model_path, monkeypatch, capsys):
    from mlx_mixtral import cli
    from mlx_mixtral.cli import main

    def broken(*args, **kwargs):
        raise ValueError("something inside broke")

    monkeypatch.setattr(cli, "stream_generate", broken)
    assert main(_raw(model_path)) == 1
    assert capsys.readouterr().err == ("error: unexpected ValueError: something inside broke "
                                       "(set MLX_MIXTRAL_DEBUG=1 for details)\n")
    monkeypatch.setenv("MLX_MIXTRAL_DEBUG", "1")
    with pytest.raises(ValueError, match="something inside broke"):
        main(_raw(model_path))


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    r = subprocess.run(["mlx-mixtral", "--version"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.strip() == f"mlx-mixtral {version('mlx-mixtral')} (mlx {version('mlx')})"
