"""What a loaded model carries besides its weights, declared in one place.

`loading` fills it in; the front doors, prompt caches and the expert views read it by attribute.
Every field has a meaning when empty: a model built by hand has no fingerprint (its KV caches
cannot be saved), a resident model no expert cache, a model in one process no split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the runtime pieces live in the features that make them
    from .distributed.sharding import Split
    from .experts.expert_cache import ExpertCache
    from .experts.routing import RoutingLog


@dataclass
class Runtime:
    """The run-time extras of a loaded model (see the module docstring)."""

    expert_cache: ExpertCache | None = None  # streaming experts within `--max-memory`
    split: Split | None = None  # this process's share under mlx.launch
    routing_log: RoutingLog | None = None  # which experts were chosen, once anyone asked
    # What saved KV caches are checked against (config and every weight byte), computed on first
    # use: hashing a whole model is worth it only when a cache is saved or loaded.
    fingerprint_of: Callable[[], str] | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str | None:
        """The model's fingerprint (None for a model not loaded from a folder)."""
        if self._fingerprint is None and self.fingerprint_of is not None:
            self._fingerprint = self.fingerprint_of()
        return self._fingerprint

    def close(self) -> None:
        """Give back what the model holds beyond its arrays: the expert cache's reader threads,
        open files and the process-wide memory settings it changed. Idempotent."""
        if self.expert_cache is not None:
            self.expert_cache.close()
