"""What a loaded model carries besides its weights, declared in one place.

`loading` fills it in; the front doors, prompt caches and the expert views read it by attribute.
Every field has a meaning when empty: a model built by hand has no fingerprint (its KV caches
cannot be saved), a resident model no expert cache, a model in one process no split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the runtime pieces live in the features that make them
    from .distributed.sharding import Split
    from .experts.expert_cache import ExpertCache
    from .experts.routing import RoutingLog


@dataclass
class Runtime:
    """The run-time extras of a loaded model (see the module docstring)."""

    fingerprint: str | None = None  # what saved KV caches are checked against (weights and config)
    expert_cache: ExpertCache | None = None  # streaming experts within `--max-memory`
    split: Split | None = None  # this process's share under mlx.launch
    routing_log: RoutingLog | None = None  # which experts were chosen, once anyone asked

    def close(self) -> None:
        """Give back what the model holds beyond its arrays: the expert cache's reader threads,
        open files and the process-wide memory settings it changed. Idempotent."""
        if self.expert_cache is not None:
            self.expert_cache.close()
