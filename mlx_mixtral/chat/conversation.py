"""A chat conversation and the KV cache that mirrors it: the logic of the chat REPL, without a terminal.

The invariant this module keeps: the model always sees exactly
`tokenizer.apply_chat_template(conversation)`, as if the whole conversation were prefilled from
scratch, while each turn computes only the tokens that are new. Replies are stored as text and
the conversation is re-encoded every turn, because re-encoding a reply need not give back the ids
that were generated (and an interrupted reply gets no EOS while generating, but one once stored).
So a `PromptCache` (see `prompt_cache`) remembers which ids its KV cache holds, and each turn
feeds only what follows the longest prefix it shares with the new prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import mlx.core as mx

from .. import prompt_cache
from ..errors import MixtralError
from ..files import atomic_write, in_place, reason, regular_file
from ..generate import GenerationResponse, stream_generate
from ..kv_format import FLOAT, KVFormat
from ..prompt_cache import PromptCache
from ..sampling import SamplingParams, check_max_tokens, check_seed
from ..tokenizer import Tokenizer


@dataclass
class Exchange:
    """One user message and the reply to it (`interrupted`: the user stopped it part way).

    A cut reply is stored as exactly the text the model wrote, without an "[interrupted]"
    marker: a marker would be text the model never produced (and might imitate), and would
    change the encoding of a prefix the cache already holds. The flag is kept beside the text
    instead, and saved as `"interrupted": true`, outside what the model sees.
    """

    user: str
    reply: str
    interrupted: bool = False


@dataclass
class Conversation:
    """The system text and the exchanges so far: the single source of what the model sees."""

    system: str | None = None
    exchanges: list[Exchange] = field(default_factory=list)

    def messages(self, next_user: str | None = None) -> list[dict]:
        """The chat messages for `apply_chat_template`, optionally with a new user message last."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for e in self.exchanges:
            out += [{"role": "user", "content": e.user}, {"role": "assistant", "content": e.reply}]
        if next_user is not None:
            out.append({"role": "user", "content": next_user})
        return out

    def to_json(self, chat_format: str | None = None) -> str:
        """The conversation as JSON: chat messages, an assistant one flagged if it was cut short,
        and the chat format's fingerprint it was held in (for the reader; the messages load under
        any format, the KV cache beside them only under this one)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for e in self.exchanges:
            messages.append({"role": "user", "content": e.user})
            messages.append({"role": "assistant", "content": e.reply, **({"interrupted": True} if e.interrupted else {})})
        data = {"messages": messages, **({"chat_format": chat_format} if chat_format else {})}
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "the file") -> Conversation:
        """Parse what `to_json` writes; anything else raises MixtralError naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MixtralError(f"{source} is not valid JSON ({e.msg} at line {e.lineno})") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list):
            raise MixtralError(f"{source} is not a saved conversation: expected an object with a 'messages' list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                raise MixtralError(f"{source}: message {i} needs a 'role' and a string 'content'")
        conversation = cls()
        if messages and messages[0].get("role") == "system":
            conversation.system = messages.pop(0)["content"] or None
        if len(messages) % 2:
            raise MixtralError(f"{source}: the conversation must end with an assistant reply")
        for i in range(0, len(messages), 2):
            user, reply = messages[i], messages[i + 1]
            if user.get("role") != "user" or reply.get("role") != "assistant":
                raise MixtralError(
                    f"{source}: messages must alternate user, assistant after an optional system "
                    f"message (message {i} is {user.get('role')!r}, {i + 1} is {reply.get('role')!r})"
                )
            if not reply["content"]:
                raise MixtralError(f"{source}: the assistant reply in message {i + 1} is empty")
            conversation.exchanges.append(Exchange(user["content"], reply["content"], bool(reply.get("interrupted"))))
        return conversation

    def save(self, path: str | os.PathLike, chat_format: str | None = None) -> Path:
        """Write the JSON to `path`, whole or not at all (a failed save keeps the previous file and
        raises MixtralError saying why); returns the path."""
        return atomic_write(path, self.to_json(chat_format), "conversation")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Conversation:
        """Read a conversation saved by `save` (a regular file: a FIFO or device is refused)."""
        path = regular_file(path, "saved conversation")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MixtralError(f"{path} is not a text file") from None
        except OSError as e:
            raise MixtralError(f"cannot read {path}: {reason(e)}") from None
        return cls.from_json(text, source=str(path))


KV_SAVE_LIMIT = 1 << 30  # `/save` keeps the KV cache beside the JSON when it is at most this big


def kv_file(path: Path) -> Path:
    """Where the KV cache of the conversation saved at `path` goes."""
    return path.with_name(path.name + ".kv")


# The knobs `/set` changes: the sampling parameters plus these two.
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))
SETTING_KEYS = (*SAMPLING_KEYS, "max_tokens", "seed")


@dataclass
class Settings:
    """What shapes each reply, always valid: bad values raise MixtralError on creation or update."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        self.sampling.validate()
        check_max_tokens(self.max_tokens)
        if self.seed is not None:
            check_seed(self.seed)

    def items(self) -> list[tuple[str, object]]:
        """(name, value) of every setting, in `/set` order."""
        return [(k, getattr(self.sampling, k)) for k in SAMPLING_KEYS] + [
            ("max_tokens", self.max_tokens), ("seed", self.seed)]

    def update(self, key: str, text: str) -> str:
        """Set `key` from `text`, or raise MixtralError (one line) and change nothing.

        Returns the key's canonical name (`top-p` and `top_p` are the same setting).
        """
        key = key.replace("-", "_")
        if key not in SETTING_KEYS:
            raise MixtralError(f"unknown setting {key!r}; settings: {', '.join(SETTING_KEYS)}")
        value: object = None
        if not (key == "seed" and text.lower() in ("none", "off")):
            kind = int if key in ("top_k", "max_tokens", "seed") else float
            try:
                value = kind(text)
            except ValueError:
                raise MixtralError(f"{key} takes {'a whole number' if kind is int else 'a number'}, "
                                   f"not {text!r}") from None
        if key in SAMPLING_KEYS:
            checked = replace(self, sampling=replace(self.sampling, **{key: value}))
        else:
            checked = replace(self, **{key: value})
        self.sampling, self.max_tokens, self.seed = checked.sampling, checked.max_tokens, checked.seed
        return key


@dataclass
class Turn:
    """One reply in the making: its prompt, and what came of it (filled in while streaming)."""

    user: str
    prompt: list[int]  # the whole conversation's encoding, ending with this user message
    dropped: int = 0  # oldest exchanges dropped so the prompt fits the context
    fed: int = 0  # prompt ids actually computed: those not already in the cache
    text: str = ""
    interrupted: bool = False
    kept: bool = False  # whether the exchange joined the conversation (not when the reply is empty)
    last: GenerationResponse | None = None


class ChatSession:
    """A conversation with a model, whose KV cache always holds a prefix of the encoded conversation."""

    def __init__(self, model, tokenizer: Tokenizer, settings: Settings | None = None,
                 max_context: int | None = None, system: str | None = None, kv: KVFormat = FLOAT) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or Settings()
        self.limit = model.config.max_position_embeddings
        if max_context:
            self.limit = min(self.limit, max_context)
        self.conversation = Conversation(system or None)
        self.cache = PromptCache(model, kv)
        self._token_counts: dict[tuple[str, str], int] = {}
        self.last: Turn | None = None
        self.reseed()

    def reseed(self) -> None:
        """Seed sampling once per session (or `/set seed`), so `/regen` still gives a new reply."""
        if self.settings.seed is not None:
            mx.random.seed(self.settings.seed)

    def set(self, key: str, text: str) -> str:
        """`/set KEY VALUE`: update a setting (see `Settings.update`); a new seed applies at once."""
        key = self.settings.update(key, text)
        if key == "seed":
            self.reseed()
        return key

    def reply_room(self) -> int:
        """Context kept free for a reply: max_tokens, capped at a quarter of the context.

        Reserving room means a long conversation never leaves the next reply a handful of
        tokens; the cap keeps a large max_tokens from dropping most of the conversation.
        """
        return max(1, min(self.settings.max_tokens, self.limit // 4))

    def start(self, user: str) -> Turn:
        """Encode the conversation plus `user`, dropping the oldest exchanges until it fits.

        Linear in the conversation's length, however long a loaded one is: each exchange's tokens
        are counted once, newest first, only until the context is full (`_keep`); the whole prompt
        is then encoded once (again only if the count was short of the real encoding, which
        holds at most a context's worth). A message that cannot fit even alone raises MixtralError
        and leaves the conversation as is.
        """
        room = self.reply_room()
        alone = Conversation(self.conversation.system).messages(user)
        need = len(self.tokenizer.apply_chat_template(alone))
        if need + room > self.limit:
            what = "this message with the system text" if self.conversation.system else "this message"
            raise MixtralError(
                f"{what} takes {need} tokens, which does not fit the context of {self.limit} tokens "
                f"with {room} left for the reply; shorten it (the conversation is kept)"
            )
        exchanges = self.conversation.exchanges
        dropped = len(exchanges) - self._keep(self.limit - room - need)
        del exchanges[:dropped]
        while True:
            prompt = self.tokenizer.apply_chat_template(self.conversation.messages(user))
            if len(prompt) + room <= self.limit:
                return Turn(user, prompt, dropped)
            exchanges.pop(0)
            dropped += 1

    def _keep(self, budget: int) -> int:
        """How many of the newest exchanges fit in `budget` tokens, by their own encodings."""
        kept, used = 0, 0
        for exchange in reversed(self.conversation.exchanges):
            used += self._tokens_of(exchange)
            if used > budget:
                break
            kept += 1
        return kept

    def _tokens_of(self, exchange: Exchange) -> int:
        """The tokens an exchange adds to a prompt: its encoding on its own, less the BOS every
        prompt has once (remembered: a turn asks for each exchange again)."""
        key = (exchange.user, exchange.reply)
        if key not in self._token_counts:
            messages = [{"role": "user", "content": exchange.user}, {"role": "assistant", "content": exchange.reply}]
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
                count = len(ids) - (1 if ids and ids[0] == self.tokenizer.bos_id else 0)
            except MixtralError:  # a template that will not render an exchange alone: its texts
                count = len(self.tokenizer.encode_text(exchange.user)) + len(self.tokenizer.encode_text(exchange.reply))
            if len(self._token_counts) > 100_000:
                self._token_counts.clear()
            self._token_counts[key] = count
        return self._token_counts[key]

    def save(self, path: str | os.PathLike, kv: bool | None = None) -> tuple[Path, bool]:
        """Write the conversation as JSON to `path` and, beside it (`path` + ".kv"), its KV cache:
        always (`kv=True`), never (False), or when it takes at most KV_SAVE_LIMIT (None).
        Returns (path, whether the KV cache was saved). A stale .kv beside it is removed. A model
        split over processes keeps no .kv (each process holds a different part of the cache), nor
        does a conversation written to a device (`/dev/stdout`): nothing is put beside a device."""
        path = self.conversation.save(path, self.tokenizer.chat_format.fingerprint)
        if in_place(path):
            return path, False
        kv_path = kv_file(path)
        split = self.model.runtime.split is not None
        keep = bool(self.cache.ids) and not split and (kv if kv is not None else self.cache.nbytes <= KV_SAVE_LIMIT)
        if keep:
            prompt_cache.save(kv_path, self.cache, self.tokenizer)
        else:
            kv_path.unlink(missing_ok=True)
        return path, keep

    def load(self, path: str | os.PathLike) -> str | None:
        """Continue the conversation saved at `path`; with its KV cache when one was saved beside
        it for this model. Returns a line saying how the cache was resumed (None: none saved).
        Without one, the live cache stays: the next turn reuses whatever prefix it shares."""
        self.conversation = Conversation.load(path)
        kv_path = kv_file(Path(path).expanduser())
        if not kv_path.exists():
            return None
        try:
            cached, _ = prompt_cache.load(kv_path, self.model, self.tokenizer, self.cache.format)
        except MixtralError as e:
            return f"not resuming the KV cache ({e}); the next reply prefills the conversation"
        self.cache = cached
        return f"resumed the KV cache ({len(cached.ids)} tokens): no prefill for them"

    def undo(self) -> Exchange:
        """Drop the last exchange (message and reply) and return it."""
        if not self.conversation.exchanges:
            raise MixtralError("there is nothing to undo: the conversation is empty")
        return self.conversation.exchanges.pop()

    def regenerate(self) -> Turn:
        """Drop the last reply and start a new one to the same message."""
        if not self.conversation.exchanges:
            raise MixtralError("there is no reply to regenerate yet")
        last = self.conversation.exchanges.pop()
        try:
            return self.start(last.user)
        except MixtralError:
            self.conversation.exchanges.append(last)
            raise

    def stream(self, turn: Turn) -> Iterator[str]:
        """Generate the reply to `turn`, yielding text as it comes.

        Closing the generator early (Ctrl-C) keeps the partial reply, marked interrupted. Either
        way the exchange joins the conversation unless the reply is empty, and the cache keeps
        what it holds; only an exception from inside generation (e.g. Ctrl-C during the
        prefill) leaves the cache untrusted, so it is reset.
        """
        fed: list[int] = []
        generated: list[int] = []
        finished = trusted = False
        try:
            fed = self.cache.prepare(turn.prompt)
            turn.fed = len(fed)
            with closing(stream_generate(
                self.model, self.tokenizer, fed, max_tokens=self.settings.max_tokens,
                sampling=self.settings.sampling, cache=self.cache.cache, max_context=self.limit,
                history=self.cache.ids,
            )) as responses:
                for response in responses:
                    generated.append(response.token)
                    turn.text += response.text
                    turn.last = response
                    yield response.text
            finished = True
        except GeneratorExit:  # closed by the consumer between two tokens: the cache is sound
            trusted = True
            raise
        finally:
            if finished or trusted:
                self.cache.record(fed, generated)
            else:
                self.cache.reset()
            turn.interrupted = not finished
            turn.kept = bool(turn.text)
            if turn.kept:
                self.conversation.exchanges.append(Exchange(turn.user, turn.text, turn.interrupted))
            self.last = turn
