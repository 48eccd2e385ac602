"""`mlx-mixtral chat`: the terminal chat REPL.

This module is only the terminal side: reading lines (readline editing, persistent history,
multi-line input), commands, streaming replies to the screen, and Ctrl-C. What the model sees
and how the KV cache follows the conversation lives in `conversation.py`.

Ctrl-C never shows a traceback: at the prompt it discards the typed line, or (on an empty line)
asks before quitting; during a reply it stops at the next token and keeps the partial reply.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.table import Table

from ..arguments import add_model_args, add_sampling_args, kv_from_args, load_from_args, sampling_from_args
from ..distributed.group import agreed_seed
from ..errors import MixtralError
from ..experts.expert_view import heatmap, streaming_line
from ..experts.routing import log_of
from ..tokenizer import BASE_MODEL_NOTE
from .conversation import SETTING_KEYS, ChatSession, Settings, Turn

HISTORY_ENV = "MLX_MIXTRAL_HISTORY"  # a path, or empty to keep no history
HISTORY_LENGTH = 1000  # lines kept in the history file
PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'  # opens and closes a multi-line message
PASTE_WAIT_S = 0.01  # lines arriving this soon after Enter were pasted together with it

# Control characters a random (or adversarial) reply could use to garble the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def history_path() -> Path | None:
    """Where input history persists: $MLX_MIXTRAL_HISTORY, else the user's cache folder."""
    override = os.environ.get(HISTORY_ENV)
    if override is not None:
        return Path(override).expanduser() if override else None
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "mlx-mixtral" / "history"


def _readline():
    """The readline module where the platform has one (line editing and history), else None."""
    try:
        import readline  # not on every platform (it is optional in Python builds)
    except ImportError:
        return None
    return readline


class LineReader:
    """The user's input: one message or command per `read()`.

    A message spans several lines when it is a `\"\"\"` block or when lines were pasted together
    (with bracketed paste readline hands them over at once; otherwise the lines that are already
    waiting when Enter is read are joined to it).
    """

    def __init__(self, history: Path | None, warn: Callable[[str], None]) -> None:
        self.readline = _readline()
        self.history: Path | None = None
        self.discarded = False  # whether the last Ctrl-C threw away typed text
        if self.readline is None:
            return
        if "libedit" not in (self.readline.__doc__ or ""):
            self.readline.parse_and_bind("set enable-bracketed-paste on")
        if history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                history.touch()
                self.readline.read_history_file(str(history))
            except OSError as e:
                warn(f"input history is off: cannot use {history} ({e.strerror or e})")
                return
            self.readline.set_history_length(HISTORY_LENGTH)
            self.history = history

    def read(self) -> str:
        """The next message or command. Raises EOFError (Ctrl-D) or KeyboardInterrupt (Ctrl-C)."""
        line = self._line(PROMPT)
        if line.lstrip().startswith(BLOCK):
            return self._block(line.lstrip()[len(BLOCK):])
        lines = [line]
        while self._pasted_more():
            lines.append(self._line(MORE))
        return "\n".join(lines)

    def ask(self, question: str) -> str:
        """A one-off answer, kept out of the history."""
        return self._line(question, remember=False)

    def _block(self, first: str) -> str:
        """Lines up to the closing `\"\"\"` (or Ctrl-D), leading and trailing blank lines dropped."""
        lines: list[str] = []
        line = first
        try:
            while not line.rstrip().endswith(BLOCK):
                lines.append(line)
                try:
                    line = self._line(MORE)
                except EOFError:
                    line = BLOCK
        except KeyboardInterrupt:
            self.discarded = True
            raise
        lines.append(line.rstrip()[: -len(BLOCK)])
        return "\n".join(lines).strip("\n")

    def _pasted_more(self) -> bool:
        """Whether another line is already waiting on a terminal (so it came with a paste)."""
        if not sys.stdin.isatty():
            return False
        return bool(select.select([sys.stdin], [], [], PASTE_WAIT_S)[0])

    def _line(self, prompt: str, remember: bool = True) -> str:
        """`input()`, noting whether Ctrl-C discarded text and saving the line to the history."""
        rl = self.readline
        before = rl.get_current_history_length() if rl else 0
        self.discarded = False
        previous = signal.signal(signal.SIGINT, self._interrupted)
        try:
            line = input(prompt)
        finally:
            signal.signal(signal.SIGINT, previous)
        added = rl.get_current_history_length() - before if rl else 0
        if added and not remember:
            rl.remove_history_item(before)
        elif added and self.history is not None:
            try:
                rl.append_history_file(added, str(self.history))
            except OSError:
                pass  # the history file vanished mid-session: keep chatting without it
        return line

    def _interrupted(self, signum, frame) -> None:
        self.discarded = bool(self.readline and self.readline.get_line_buffer())
        raise KeyboardInterrupt


class _ReplyTerminal:
    """How the terminal behaves while a reply streams.

    Ctrl-C asks the reply to stop after the current token. Before the first token (during the
    prefill) there is no token boundary to wait for, so Ctrl-C raises KeyboardInterrupt there;
    `ChatSession.stream` then resets the cache. Keystrokes are not echoed, so they cannot garble
    the reply (text typed ahead still reaches the next prompt, where readline shows it).
    """

    def __enter__(self) -> _ReplyTerminal:
        self.streaming = self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._tty = None
        if sys.stdin.isatty():
            fd = sys.stdin.fileno()
            self._tty = (fd, termios.tcgetattr(fd))
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)
        if self._tty is not None:
            termios.tcsetattr(self._tty[0], termios.TCSANOW, self._tty[1])

    def _handle(self, signum, frame) -> None:
        if not self.streaming:
            raise KeyboardInterrupt
        self.requested = True


def _shown(value: object) -> str:
    """A setting's value as `/set` takes it ("none" for an unset seed)."""
    return "none" if value is None else str(value)


def _count(n: int, noun: str) -> str:
    """A count with its noun, so the screen reads "1 token" and "2 tokens"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class _Command:
    names: tuple[str, ...]
    usage: str
    help: str
    run: Callable[[str], bool | None]  # True ends the session


class Repl:
    """The loop: read a line, run a command or answer a message, repeat."""

    def __init__(self, console: Console, session: ChatSession, reader: LineReader, model_name: str) -> None:
        self.console = console
        self.session = session
        self.reader = reader
        self.model_name = model_name
        self.commands = [
            _Command(("help",), "", "list the commands", self._cmd_help),
            _Command(("clear",), "", "start a new conversation (the system text stays)", self._cmd_clear),
            _Command(("system",), "[TEXT | -]", "show, set, or remove (-) the system text", self._cmd_system),
            _Command(("set",), "KEY VALUE", "change a setting: " + ", ".join(SETTING_KEYS), self._cmd_set),
            _Command(("show",), "", "show the settings", self._cmd_show),
            _Command(("regen",), "", "answer the last message again", self._cmd_regen),
            _Command(("undo",), "", "drop the last message and its reply", self._cmd_undo),
            _Command(("save",), "FILE [--kv|--no-kv]", "save the conversation as JSON, and its KV cache "
                     "beside it (FILE.kv) if at most 1 GB or --kv", self._cmd_save),
            _Command(("load",), "FILE", "continue a conversation saved with /save (with its KV cache: "
                     "no prefill)", self._cmd_load),
            _Command(("stats",), "", "context use, speed and memory (and expert streaming)", self._cmd_stats),
            _Command(("experts",), "", "which experts each layer used over the last reply", self._cmd_experts),
            _Command(("exit", "bye"), "", "quit (Ctrl-D too)", lambda arg: True),
        ]
        self._by_name = {name: c for c in self.commands for name in c.names}

    # -- the loop -------------------------------------------------------------------------------
    def loop(self) -> None:
        """Run until /exit, Ctrl-D, or a confirmed Ctrl-C."""
        self.note(
            f"Chatting with {self.model_name} (context {self.session.limit} tokens, chat format: "
            f"{self.session.tokenizer.chat_format.name}). /help lists the "
            'commands; """ starts a multi-line message; Ctrl-C stops a reply; Ctrl-D quits.'
        )
        if self.session.tokenizer.chat_format.kind == "none":
            self.note(BASE_MODEL_NOTE, style="yellow")
        while True:
            try:
                text = self.reader.read()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print()
                if not self.reader.discarded and self._confirm_quit():
                    return
                continue
            try:
                if self.handle(text):
                    return
            except MixtralError as e:
                self.error(str(e))
            except KeyboardInterrupt:  # during a command: nothing half-done is worth keeping
                self.console.print()
                self.note("interrupted")

    def handle(self, text: str) -> bool:
        """Run one command or answer one message; True when the session should end."""
        if not text.strip():
            return False
        if text.startswith("/") and not text.startswith("//") and "\n" not in text:
            name, _, arg = text[1:].strip().partition(" ")
            command = self._by_name.get(name)
            if command is None:
                self.error(f"unknown command /{name}; /help lists the commands "
                           "(start a message with // to send text that begins with /)")
                return False
            if arg.strip() and not command.usage:
                self.error(f"/{name} takes no arguments")
                return False
            return bool(command.run(arg.strip()))
        self.answer(self.session.start(text[1:] if text.startswith("//") else text))
        return False

    def _confirm_quit(self) -> bool:
        try:
            answer = self.reader.ask("Quit? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            self.console.print()
            return True
        return answer.strip().lower() in ("y", "yes")

    # -- replies --------------------------------------------------------------------------------
    def answer(self, turn: Turn) -> None:
        """Stream the reply to `turn`, then say how it ended and how fast it was."""
        if turn.dropped:
            self.note(f"[dropped the {_count(turn.dropped, 'oldest exchange')} to fit the context of "
                      f"{self.session.limit} tokens]")
        ended_line = True
        model = self.session.model
        log_of(model).reset()  # /experts and /stats describe this reply
        if model.runtime.expert_cache is not None:
            model.runtime.expert_cache.reset_stats()
        stream = self.session.stream(turn)
        with _ReplyTerminal() as interrupt:
            try:
                for piece in stream:
                    interrupt.streaming = True
                    if piece:
                        self.console.out(_CONTROL.sub("\ufffd", piece), end="", highlight=False)
                        ended_line = piece.endswith("\n")
                    if interrupt.requested:
                        break
            except KeyboardInterrupt:
                pass  # during the prefill; the session has reset its cache
            finally:
                stream.close()
        if not ended_line:
            self.console.print()
        self._report(turn)

    def _report(self, turn: Turn) -> None:
        if not turn.kept:
            why = "interrupted before the reply began" if turn.interrupted else "the model gave an empty reply"
            self.note(f"[{why}; your message was not kept]", style="yellow")
        elif turn.interrupted:
            self.note("[interrupted]", style="yellow")
        elif turn.last.finish_reason == "length":
            if turn.last.generation_tokens < self.session.settings.max_tokens:
                self.note("[stopped: the context is full]", style="yellow")
            else:
                self.note(f"[stopped at max_tokens={self.session.settings.max_tokens}]", style="yellow")
        if turn.last is not None:
            r = turn.last
            self.note(
                f"prompt: {_count(turn.fed, 'new token')}, {r.prompt_tps:.1f} tok/s | generation: "
                f"{_count(r.generation_tokens, 'token')}, {r.generation_tps:.1f} tok/s | context: "
                f"{len(self.session.cache.ids)}/{self.session.limit} tokens | peak memory: "
                f"{r.peak_memory_gb:.2f} GB"
            )

    # -- commands -------------------------------------------------------------------------------
    def _cmd_help(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        for c in self.commands:
            table.add_row(" ".join(f"/{n}" for n in c.names) + (f" {c.usage}" if c.usage else ""), c.help)
        self.console.print(table)
        self.note('A message of several lines: start and end it with """ (or paste it). '
                  "Ctrl-C stops a reply; at an empty prompt it asks before quitting.")

    def _cmd_clear(self, arg: str) -> None:
        self.session.conversation.exchanges.clear()
        self.note("new conversation")

    def _cmd_system(self, arg: str) -> None:
        conversation = self.session.conversation
        if not arg:
            self.note(f"system text: {conversation.system}" if conversation.system else "no system text")
            return
        conversation.system = None if arg == "-" else arg
        self.note("system text removed" if arg == "-" else "system text set")

    def _cmd_set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if not value.strip():
            raise MixtralError(f"usage: /set KEY VALUE, with KEY one of {', '.join(SETTING_KEYS)}")
        key = self.session.set(key, value.strip())
        self.note(f"{key} = {_shown(dict(self.session.settings.items())[key])}")

    def _cmd_show(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        for key, value in self.session.settings.items():
            table.add_row(key, _shown(value))
        table.add_row("context", f"{self.session.limit} tokens")
        table.add_row("chat format", self.session.tokenizer.chat_format.name)
        table.add_row("system", self.session.conversation.system or "none")
        self.console.print(table)

    def _cmd_regen(self, arg: str) -> None:
        self.answer(self.session.regenerate())

    def _cmd_undo(self, arg: str) -> None:
        self.session.undo()
        self.note(f"dropped the last exchange ({len(self.session.conversation.exchanges)} left)")

    def _cmd_save(self, arg: str) -> None:
        words = arg.split()
        flags = [w for w in words if w in ("--kv", "--no-kv")]
        name = " ".join(w for w in words if w not in flags)
        if not name or len(flags) > 1:
            raise MixtralError("usage: /save FILE [--kv|--no-kv]")
        kv = None if not flags else flags[0] == "--kv"
        path, kept = self.session.save(name, kv)
        with_kv = f" and its KV cache ({_count(len(self.session.cache.ids), 'token')})" if kept else ""
        self.note(f"saved {_count(len(self.session.conversation.exchanges), 'exchange')}{with_kv} to {path}")

    def _cmd_load(self, arg: str) -> None:
        if not arg:
            raise MixtralError("usage: /load FILE")
        self.resume(arg)

    def resume(self, path: str) -> None:
        """Load a saved conversation (and its KV cache, if saved for this model), saying so."""
        how = self.session.load(path)
        system = " and a system text" if self.session.conversation.system else ""
        self.note(f"loaded {_count(len(self.session.conversation.exchanges), 'exchange')}{system} from {path}")
        if how is not None:
            self.note(how)

    def _cmd_stats(self, arg: str) -> None:
        s = self.session
        table = Table.grid(padding=(0, 2))
        table.add_row("model", self.model_name)
        table.add_row("conversation", _count(len(s.conversation.exchanges), "exchange"))
        table.add_row("context", f"{len(s.cache.ids)}/{s.limit} tokens in the cache")
        turn = s.last
        if turn is not None and turn.last is not None:
            r = turn.last
            table.add_row("last prompt", f"{_count(turn.fed, 'new token')} ({len(turn.prompt) - turn.fed} reused "
                                         f"from the cache), {r.prompt_tps:.1f} tok/s")
            table.add_row("last reply", f"{_count(r.generation_tokens, 'token')}, {r.generation_tps:.1f} tok/s")
            table.add_row("peak memory", f"{r.peak_memory_gb:.2f} GB")
        streaming = streaming_line(s.model)
        if streaming is not None:
            table.add_row("streaming", streaming.removeprefix("experts: "))
        self.console.print(table)

    def _cmd_experts(self, arg: str) -> None:
        table = heatmap(log_of(self.session.model))
        if table is None:
            self.note("no reply yet: /experts shows the routing of the last reply")
            return
        self.console.print(table)

    # -- output ---------------------------------------------------------------------------------
    def note(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.console.print(text, style="red", markup=False, highlight=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `chat` subcommand's flags."""
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="system text for the conversation")
    parser.add_argument("--max-context", type=int, default=None,
                        help="most tokens in the context (default: the model's limit); the oldest "
                             "exchanges are dropped to stay within it")
    parser.add_argument("--resume", default=None, metavar="FILE",
                        help="start by loading a conversation saved with /save (and its KV cache)")
    add_sampling_args(parser, temp=0.7)


def run(args: argparse.Namespace) -> int:
    """Load the model and chat until the user quits."""
    settings = Settings(sampling_from_args(args), args.max_tokens, args.seed)
    if args.max_context is not None and args.max_context < 2:
        raise MixtralError(f"--max-context must be at least 2 tokens, got {args.max_context}")
    console = Console(highlight=False)
    model, tokenizer = load_from_args(
        args, lambda line: console.print(line, style="dim", markup=False, highlight=False),
        context=lambda _: args.max_context)
    session_seed = agreed_seed(model, settings.seed)
    if session_seed is not None and settings.seed is None:  # split over processes: one RNG state for all
        mx.random.seed(session_seed)
    session = ChatSession(model, tokenizer, settings, args.max_context, args.system,
                          kv_from_args(args, model.config.head_dim))
    reader = LineReader(history_path(), warn=lambda text: console.print(text, style="yellow", markup=False))
    repl = Repl(console, session, reader, args.model)
    if args.resume is not None:
        repl.resume(args.resume)
    repl.loop()
    return 0
