"""`mlx-mixtral chat` driven in a pseudo-terminal, as a user would: what the screen shows.

Each test runs the real command (`python -m mlx_mixtral.cli chat`) on the tiny random gqa model.
Its replies are random text, but greedy (`--temp 0`) and long: it practically never emits EOS.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

import mlx_mixtral
from mlx_mixtral.chat import conversation
from mlx_mixtral.chat.conversation import ChatSession, Settings
from mlx_mixtral.chat.repl import Repl

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[=>]|\r")
PROMPT = r"(?m)^>>> "
STAT = (r"prompt: (?P<new>\d+) new tokens?, [\d.]+ tok/s \| generation: (?P<gen>\d+) tokens?, [\d.]+ tok/s "
        r"\| context: (?P<ctx>\d+)/(?P<limit>\d+) tokens \| peak memory: [\d.]+ GB\n")
UP = "\x1b[A"
# Linux system calls a process waiting for terminal input sits in: read, poll, select, pselect6,
# ppoll (Python's readline waits in select/pselect6).
WAITING_SYSCALLS = {"x86_64": {0, 7, 23, 270, 271}, "aarch64": {63, 72, 73}}
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


def table(*rows: tuple[str, str]) -> str:
    """A regex for consecutive rows of a two-column table (rich pads cells with spaces)."""
    return "".join(rf"{re.escape(key)} +{value} *\n" for key, value in rows)


@pytest.fixture(scope="module")
def model(hf_checkpoint_factory) -> Path:
    return hf_checkpoint_factory("gqa")


class Chat:
    """One chat session in a pseudo-terminal; `expect` searches the screen text without colours."""

    def __init__(self, model: Path, *args: str, env: dict[str, str]) -> None:
        self.child = pexpect.spawn(
            sys.executable, ["-m", "mlx_mixtral.cli", "chat", "--model", str(model), *args],
            env={**os.environ, "TERM": "xterm-256color", **env}, encoding="utf-8",
            dimensions=(50, 250), timeout=60,
        )
        self.raw = ""
        self.pos = 0

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw)

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        """The next match of `pattern` after the previous one (fails with the screen so far)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.screen, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self.child.isalive() and not self._read(0.1):
                raise AssertionError(f"{pattern!r} not on the screen; after the last match:\n"
                                     f"{self.screen[self.pos:][-3000:]}")
            self._read(min(left, 0.5))

    def _read(self, timeout: float) -> bool:
        try:
            self.raw += self.child.read_nonblocking(65536, timeout=timeout)
            return True
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False

    def line(self, text: str) -> None:
        """Type `text` and Enter at the next prompt."""
        self.expect(PROMPT)
        self.child.send(text + "\r")

    def say(self, text: str) -> re.Match:
        """Send a message; the stat line after its reply."""
        self.line(text)
        return self.expect(STAT)

    def interrupt(self) -> None:
        """Ctrl-C once the chat waits for keys (at a prompt, or in a triple-quoted block).

        readline draws the prompt just before it waits for keys; a signal in between is only
        noticed at the next key press. So wait until the process is blocked reading its
        terminal, as the kernel reports it, rather than for a fixed time.
        """
        self._wait_for_keys()
        self.child.sendintr()

    def interrupt_reply(self) -> None:
        """Ctrl-C while a reply streams, however fast the machine: the process is stopped as
        soon as the reply is seen, so it cannot finish before the signal arrives."""
        os.kill(self.child.pid, signal.SIGSTOP)
        try:
            self.child.sendintr()
        finally:
            os.kill(self.child.pid, signal.SIGCONT)

    def _wait_for_keys(self, timeout: float = 10) -> None:
        numbers = WAITING_SYSCALLS.get(platform.machine())
        syscall = Path(f"/proc/{self.child.pid}/syscall")
        if numbers is None or not syscall.exists():  # no /proc (macOS): the fallback is a pause
            time.sleep(0.5)
            return
        deadline = time.monotonic() + timeout
        calm = 0
        while time.monotonic() < deadline:
            try:
                current = syscall.read_text().split()[0]
            except (OSError, IndexError):
                current = ""
            calm = calm + 1 if current.isdigit() and int(current) in numbers else 0
            if calm >= 3:  # the same wait seen three times, 10 ms apart
                return
            time.sleep(0.01)
        raise AssertionError(f"the chat never waited for keys; screen:\n{self.screen[-2000:]}")

    def command(self, text: str, answer: str) -> re.Match:
        """Type `text` at the next prompt; the match of `answer` in what follows."""
        self.line(text)
        return self.expect(answer)

    def exits(self) -> int:
        """Wait for the process to end; its exit status (the screen must hold no traceback)."""
        self.child.expect(pexpect.EOF, timeout=30)
        self.raw += self.child.before or ""
        self.child.close()
        assert "Traceback" not in self.screen, self.screen
        return self.child.exitstatus


@pytest.fixture
def chat(model, tmp_path):
    """Start sessions with the history in `tmp_path`; every session must end cleanly."""
    sessions = []

    def start(*args: str, **env: str) -> Chat:
        session = Chat(model, *args, env={"MLX_MIXTRAL_HISTORY": str(tmp_path / "history"), **env})
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        if session.child.isalive():
            session.child.terminate(force=True)
        assert "Traceback" not in session.screen, session.screen


def test_multi_turn_conversation_reuses_the_cache(chat):
    c = chat("--temp", "0", "--max-tokens", "8")
    c.expect(r"context 512 tokens")
    c.line("Hello there")
    assert c.expect(r"Hello there\n(?s:(.+?))\n\[stopped at max_tokens=8\]\n")[1].strip()  # the reply
    first = c.expect(STAT)
    assert int(first["gen"]) == 8 and int(first["limit"]) == 512
    second = c.say("What is a mixture of experts?")
    assert int(second["ctx"]) > int(first["ctx"])
    c.command("/stats", table(("conversation", "2 exchanges")))
    reused = int(c.expect(r"last prompt +\d+ new tokens \((\d+) reused from the cache\)")[1])
    assert reused >= 10  # at least BOS and the first message came from the cache
    again = c.say("/regen")
    assert again["new"] == "1" and again["ctx"] == second["ctx"]  # only the last prompt token was fed
    c.command("/undo", r"dropped the last exchange \(1 left\)")
    c.command("/stats", table(("conversation", "1 exchange")))
    c.command("/clear", r"new conversation")
    c.command("/stats", r"conversation +0 exchanges")
    c.line("/exit")
    assert c.exits() == 0


def test_commands_settings_and_bad_input(chat, tmp_path):
    c = chat("--max-tokens", "4", "--seed", "1")
    c.line("/help")
    for name in ["/help", "/clear", "/system", "/set", "/show", "/regen", "/undo", "/save", "/load",
                 "/stats", "/experts", "/exit /bye"]:
        c.expect(re.escape(name))
    c.command("/show", table(("temp", r"0\.7"), ("top_p", r"1\.0"), ("top_k", "0"), ("min_p", r"0\.0"),
                             ("repetition_penalty", r"1\.0"), ("frequency_penalty", r"0\.0"),
                             ("presence_penalty", r"0\.0"), ("max_tokens", "4"), ("seed", "1"),
                             ("context", "512 tokens"), ("chat format", re.escape("Mistral v1 ([INST] text)")),
                             ("system", "none")))
    c.command("/set temp 0.2", r"temp = 0\.2\n")
    c.command("/set top-p 0.9", r"top_p = 0\.9\n")
    c.command("/set top_k 5", r"top_k = 5\n")
    c.command("/set min_p 0.05", r"min_p = 0\.05\n")
    c.command("/set repetition_penalty 1.1", r"repetition_penalty = 1\.1\n")
    c.command("/set seed none", r"seed = none\n")
    c.command("/set max_tokens 3", r"max_tokens = 3\n")
    c.command("/show", table(("temp", r"0\.2"), ("top_p", r"0\.9"), ("top_k", "5"), ("min_p", r"0\.05"),
                             ("repetition_penalty", r"1\.1"), ("frequency_penalty", r"0\.0"),
                             ("presence_penalty", r"0\.0"), ("max_tokens", "3"), ("seed", "none")))
    assert c.say("Hi")["gen"] == "3"
    c.command("/set temp abc", r"\ntemp takes a number, not 'abc'\n")
    c.command("/set top_p 2", r"\ntop-p must be in \(0, 1\], got 2\.0\n")
    c.command("/set colour red", r"\nunknown setting 'colour'; settings: temp, top_p")
    c.command("/set temp", r"\nusage: /set KEY VALUE, with KEY one of temp")
    c.command("/frobnicate now", r"\nunknown command /frobnicate; /help lists the commands")
    c.command("/regen now", r"\n/regen takes no arguments\n")
    c.command("/system", r"\nno system text\n")
    c.command("/system Answer in French.", r"\nsystem text set\n")
    c.command("/system", r"\nsystem text: Answer in French\.\n")
    c.command("/show", table(("system", r"Answer in French\.")))
    c.say("//etc is a folder")  # // sends a message that starts with /
    c.command("/system -", r"\nsystem text removed\n")
    c.command(f"/save {tmp_path / 'chat.json'}", r"saved 2 exchanges and its KV cache \(\d+ tokens\) to ")
    c.line("/bye")
    assert c.exits() == 0
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[2]["content"] == "/etc is a folder"


def test_multi_line_input(chat, tmp_path):
    c = chat("--max-tokens", "3")
    c.line('"""')
    c.child.send("first line\r")
    c.expect(r"\.\.\. first line")
    c.child.send("  indented second\r")
    c.child.send('"""\r')
    c.expect(STAT)
    c.line(f"{PASTE_START}pasted one\npasted two{PASTE_END}")  # a terminal's bracketed paste
    c.expect(STAT)
    c.line("typed ahead\rin one go")  # lines already waiting when Enter is read: a paste too
    c.expect(STAT)
    c.line('"""one-line block"""')
    c.expect(STAT)
    c.command(f"/save {tmp_path / 'chat.json'}", r"saved 4 exchanges")
    c.line("/exit")
    assert c.exits() == 0
    users = [m["content"] for m in json.loads((tmp_path / "chat.json").read_text())["messages"][::2]]
    assert users == ["first line\n  indented second", "pasted one\npasted two", "typed ahead\nin one go",
                     "one-line block"]


def test_ctrl_c_stops_a_reply_keeps_it_and_the_chat_goes_on(chat, tmp_path):
    c = chat("--temp", "0", "--max-tokens", "2000")
    c.line("Tell me a long story")
    c.expect(r"Tell me a long story\n")
    c.expect(r"[^\n]{60}")  # the reply is streaming
    c.interrupt_reply()
    c.expect(r"\n\[interrupted\]\n")
    cut = c.expect(STAT)
    assert 0 < int(cut["gen"]) < 2000 and int(cut["ctx"]) < 2000
    c.command("/set max_tokens 5", "max_tokens = 5")
    after = c.say("Go on")
    assert int(after["ctx"]) > int(cut["ctx"])
    c.command(f"/save {tmp_path / 'chat.json'}", r"saved 2 exchanges")
    c.line("/exit")
    assert c.exits() == 0
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert messages[1]["interrupted"] is True and messages[1]["content"]
    assert "interrupted" not in messages[3]


def test_save_then_load_in_a_new_session(chat, tmp_path):
    saved = tmp_path / "chat.json"
    a = chat("--max-tokens", "4", "--system", "Be brief.", "--temp", "0")  # greedy: the same replies each run
    a.say("Hello")
    a.say("Tell me about the sea")
    a.command(f"/save {saved}", r"saved 2 exchanges and its KV cache \(\d+ tokens\) to ")
    plain = tmp_path / "plain.json"
    a.command(f"/save {plain} --no-kv", r"saved 2 exchanges to ")
    a.command(f"/save {plain} --kv --no-kv", r"\nusage: /save FILE \[--kv\|--no-kv\]\n")
    a.command(f"/save {tmp_path / 'no' / 'such' / 'dir.json'}",
              r"\ncannot save the conversation to .*dir\.json: no such file or directory \(nothing was changed there\)\n")
    a.line("/exit")
    assert a.exits() == 0

    (tmp_path / "corrupt.json").write_text('{"messages": [')
    b = chat("--max-tokens", "4")
    b.command(f"/load {tmp_path / 'missing.json'}", r"\nno saved conversation at .*missing\.json: no such file\n")
    b.command(f"/load {tmp_path / 'corrupt.json'}", r"\n.*corrupt\.json is not valid JSON \(.*\)\n")
    b.command("/load", r"\nusage: /load FILE\n")
    b.command(f"/load {plain}", r"loaded 2 exchanges and a system text from ")
    b.command("/system", r"system text: Be brief\.")
    b.command("/stats", table(("conversation", "2 exchanges"), ("context", "0/512 tokens in the cache")))
    turn = b.say("And the sky?")
    # The whole loaded conversation went into the fresh cache, plus the new reply.
    assert int(turn["ctx"]) == int(turn["new"]) + int(turn["gen"]) - 1 > 30
    # With the KV cache saved beside it, the conversation resumes without its prefill.
    b.command(f"/load {saved}", r"resumed the KV cache \(\d+ tokens\): no prefill for them\n")
    turn = b.say("And the sky?")
    assert int(turn["new"]) < 20 < int(turn["ctx"])
    b.line("/exit")
    assert b.exits() == 0


def test_history_persists_across_sessions(chat, tmp_path):
    history = tmp_path / "my-history"
    a = chat("--max-tokens", "3", MLX_MIXTRAL_HISTORY=str(history))
    a.say("remember this line")
    a.command("/show", table(("temp", r"0\.7")))
    a.expect(PROMPT)
    a.interrupt()  # Ctrl-C at an empty prompt asks; the answer stays out of the history
    a.expect(r"Quit\? \[y/N\] ")
    a.child.send("y\r")
    assert a.exits() == 0
    assert history.read_text().splitlines() == ["remember this line", "/show"]

    b = chat("--max-tokens", "3", MLX_MIXTRAL_HISTORY=str(history))
    b.expect(PROMPT)
    b.child.send(UP + UP)
    b.expect(r"remember this line")
    b.child.send("\r")
    b.expect(STAT)
    b.line("/exit")
    assert b.exits() == 0
    assert history.read_text().splitlines()[-2:] == ["remember this line", "/exit"]


def test_history_goes_to_the_cache_folder_by_default(model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_MIXTRAL_HISTORY"}
    child = pexpect.spawn(sys.executable, ["-m", "mlx_mixtral.cli", "chat", "--model", str(model)],
                          env={**env, "XDG_CACHE_HOME": str(tmp_path)}, encoding="utf-8", timeout=60)
    child.expect(">>> ")
    child.send("/show\r")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert (tmp_path / "mlx-mixtral" / "history").read_text() == "/show\n"


def test_context_overflow_drops_oldest_exchanges(chat):
    c = chat("--temp", "0", "--max-tokens", "12", "--max-context", "100", "--system", "Be kind.")
    c.expect(r"context 100 tokens")
    contexts, notices = [], []
    for n in range(1, 6):
        c.line(f"message number {n}")
        start = c.pos
        contexts.append(int(c.expect(STAT)["ctx"]))
        notices += re.findall(r"\n\[dropped the (\d+) oldest exchanges? to fit the context of 100 tokens\]\n",
                              c.screen[start:c.pos])
    assert max(contexts) <= 100 and notices
    kept = int(c.command("/stats", r"conversation +(\d+) exchanges?")[1])
    assert kept == 5 - sum(map(int, notices))
    c.command("word " * 150, r"\nthis message with the system text takes \d+ tokens, which does not fit the "
                             r"context of 100 tokens with 12 left for the reply; shorten it \(the "
                             r"conversation is kept\)\n")
    assert int(c.command("/stats", r"conversation +(\d+) exchanges?")[1]) == kept
    c.command("/system", r"system text: Be kind\.")
    c.line("/exit")
    assert c.exits() == 0


def test_a_reply_that_fills_the_context_says_so(chat):
    c = chat("--temp", "0", "--max-tokens", "1000", "--max-context", "60")
    c.line("Hi")
    c.expect(r"\n\[stopped: the context is full\]\n")
    full = c.expect(STAT)
    assert int(full["ctx"]) >= 59 and int(full["gen"]) < 1000
    after = c.say("Again")  # the next message still gets an answer: older exchanges make room
    assert int(after["gen"]) > 0 and int(after["ctx"]) <= 60
    c.line("/exit")
    assert c.exits() == 0


def test_ctrl_c_inside_a_block_discards_it_and_the_chat_goes_on(chat, tmp_path):
    c = chat("--max-tokens", "3")
    c.line('"""')
    c.child.send("a secret draft\r")
    c.expect(r"\.\.\. a secret draft")
    c.interrupt()
    stat = c.say("Hello")  # at the next prompt
    assert "Quit?" not in c.screen and c.screen.count("prompt:") == 1  # nothing was sent, nothing asked
    assert int(stat["ctx"]) < 30
    c.command(f"/save {tmp_path / 'chat.json'}", r"saved 1 exchange")
    c.line("/exit")
    assert c.exits() == 0
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello"]


def test_no_history_mode_writes_no_history(model, tmp_path):
    """MLX_MIXTRAL_HISTORY set to nothing keeps no history, not even in the cache folder."""
    c = Chat(model, "--max-tokens", "2", env={"MLX_MIXTRAL_HISTORY": "", "XDG_CACHE_HOME": str(tmp_path),
                                               "HOME": str(tmp_path)})
    c.say("do not remember this")
    c.line("/exit")
    assert c.exits() == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_control_characters_in_a_reply_cannot_reach_the_terminal(model, monkeypatch):
    """A reply is model output: escape sequences, bells and backspaces in it are shown as U+FFFD."""
    real = conversation.stream_generate

    def hostile(*args, **kwargs):
        for r in real(*args, **kwargs):
            yield dataclasses.replace(r, text="\x1b[2J\x07" + r.text + "\x08\x9b")

    screen = io.StringIO()
    session = ChatSession(*mlx_mixtral.load(model, progress=False), Settings(max_tokens=2))
    repl = Repl(Console(file=screen, width=200), session, reader=None, model_name="tiny")
    monkeypatch.setattr(conversation, "stream_generate", hostile)
    repl.handle("Hello")
    shown = screen.getvalue()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", shown)
    assert shown.count("\ufffd[2J\ufffd") == 2 and "\ufffd\ufffd" in shown
    assert session.conversation.exchanges[0].reply.startswith("\x1b[2J")  # kept as the model said it


def test_quitting(chat):
    c = chat()
    c.expect(PROMPT)
    c.interrupt()
    c.expect(r"Quit\? \[y/N\] ")
    c.child.send("n\r")
    c.child.send("some text")
    c.expect(r"some text")
    c.interrupt()  # discards the typed line without asking
    c.expect(PROMPT)
    c.interrupt()
    c.expect(r"Quit\? \[y/N\] ")
    c.interrupt()  # Ctrl-C again: quit
    assert c.exits() == 0
    assert c.screen.count("Quit?") == 2

    d = chat()
    d.expect(PROMPT)
    d.child.sendeof()
    assert d.exits() == 0


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "error: /no/such/model: no such folder"),
    (["--model", ".", "--temp", "-1"], "error: temperature must be >= 0, got -1.0"),
    (["--model", ".", "--max-tokens", "0"], "error: max_tokens must be at least 1, got 0"),
    (["--model", ".", "--seed", "-1"], "error: seed must be from 0 to 2**64 - 1, got -1"),
    (["--model", ".", "--max-context", "0"], "error: --max-context must be at least 2 tokens, got 0"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    done = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "chat", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_ctrl_c_before_the_first_token_drops_the_message(model, monkeypatch):
    """A real SIGINT while the prompt is being prefilled (too quick to hit from outside on a tiny
    model, so this runs the REPL in-process): the message is dropped and the chat goes on."""
    # as in a terminal, even when the suite was started with SIGINT ignored (`nohup`, `cmd &`)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_the_prefill(model, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, before)


def _interrupt_the_prefill(model, monkeypatch) -> None:
    real = conversation.stream_generate

    def interrupted_prefill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        yield from real(*args, **kwargs)

    screen = io.StringIO()
    session = ChatSession(*mlx_mixtral.load(model, progress=False), Settings(max_tokens=3))
    repl = Repl(Console(file=screen, width=200), session, reader=None, model_name="tiny")
    repl.handle("Hello")
    monkeypatch.setattr(conversation, "stream_generate", interrupted_prefill)
    repl.handle("Tell me more")
    monkeypatch.undo()
    assert screen.getvalue().splitlines()[-1] == "[interrupted before the reply began; your message was not kept]"
    assert [e.user for e in session.conversation.exchanges] == ["Hello"]
    repl.handle("Tell me more")
    stat = re.search(STAT, screen.getvalue().split("not kept]")[1])
    assert int(stat["new"]) == int(stat["ctx"]) - int(stat["gen"]) + 1  # all prefilled afresh
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
