"""Recent Responses API responses, kept for `previous_response_id` and `GET /v1/responses/ID`.

Bounded by count and bytes (the least recently used go first). Each entry holds only what its
turn added to the conversation (its input and its output, as chat messages) and the id of the
response before it, so a long chain of turns costs what its turns cost, not the square of it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .request import APIError

MAX_STORED = 512  # responses kept for previous_response_id
MAX_STORED_BYTES = 64 * 2**20


@dataclass
class _Stored:
    response: dict
    messages: list[dict]  # what this response added to its conversation: its input and its output
    previous: str | None
    nbytes: int


class ResponseStore:
    """Recent responses by id, at most MAX_STORED of them and MAX_STORED_BYTES; each holds only what
    it added to the conversation and the id before it, so a chain costs what its turns cost."""

    def __init__(self, count: int = MAX_STORED, nbytes: int = MAX_STORED_BYTES) -> None:
        self.count, self.budget = count, nbytes
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._lock = threading.Lock()  # parsing runs on worker threads, replies on the event loop

    def put(self, response: dict, messages: list[dict], previous: str | None) -> None:
        size = len(json.dumps(response)) + len(json.dumps(messages))
        with self._lock:
            self._entries[response["id"]] = _Stored(response, messages, previous, size)
            while len(self._entries) > self.count or sum(e.nbytes for e in self._entries.values()) > self.budget:
                self._entries.popitem(last=False)

    def conversation(self, response_id: str) -> list[dict]:
        """The whole conversation up to and including response `response_id`'s output."""
        chain, at = [], response_id
        with self._lock:
            while at is not None:
                entry = self._entries.get(at)
                if entry is None:
                    raise _not_found(at, response_id)
                self._entries.move_to_end(at)
                chain.append(entry.messages)
                at = entry.previous
        return [m for messages in reversed(chain) for m in messages]

    def response(self, response_id: str) -> dict:
        with self._lock:
            entry = self._entries.get(response_id)
        if entry is None:
            raise _not_found(response_id, response_id)
        return entry.response


def _not_found(missing: str, asked: str) -> APIError:
    held = "" if missing == asked else f" (it continues {missing}, which is gone)"
    return APIError(404, f"no response with id {json.dumps(asked)} is held here{held}: responses are kept only "
                    "when stored (store: true) and only the most recent ones; send the whole conversation in input",
                    param="previous_response_id", code="previous_response_not_found")
