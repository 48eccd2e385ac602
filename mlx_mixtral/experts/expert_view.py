"""What the experts did, for people: a routing heatmap and a one-line streaming summary.

`heatmap(log)` is a rich table with a row per layer and a column per expert: each cell is the
share of that layer's routed tokens sent to the expert, shaded from dark (unused) to bright (all),
so a layer's favourites stand out at a glance. For a streamed model two columns add the cache's
hits and misses in that layer. `streaming_line(model)` summarises the budget, hit rate and
disk reads in one line (`generate --verbose`, the chat's `/stats`).
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from .budget import gb
from .routing import RoutingLog

# dark to bright: 0%, then about 1/8 steps of a layer's tokens (8 experts: 12.5% is a fair share)
_SHADES = ("grey15", "grey30", "dark_blue", "blue3", "dodger_blue2", "deep_sky_blue1", "cyan1", "white")


def _cell(share: float) -> Text:
    shade = _SHADES[min(len(_SHADES) - 1, int(share * 2 * (len(_SHADES) - 1) + 0.999))] if share else _SHADES[0]
    fg = "black" if shade in ("cyan1", "white", "deep_sky_blue1") else "white"
    return Text(f"{round(share * 100):>3}", style=f"{fg} on {shade}")


def heatmap(log: RoutingLog, title: str = "experts used over the last reply") -> Table | None:
    """The routing table, or None when nothing was routed yet."""
    usage = log.usage
    if not usage.sum():
        return None
    streamed = log.streamed
    table = Table(title=f"{title} (% of each layer's routed tokens)", show_edge=False, pad_edge=False,
                  padding=(0, 0, 0, 1), title_justify="left")
    table.add_column("layer", justify="right")
    for e in range(usage.shape[1]):
        table.add_column(f"e{e}", justify="right")
    if streamed:
        table.add_column("hits", justify="right")
        table.add_column("misses", justify="right")
    for layer, row in enumerate(usage):
        total = row.sum()
        cells = [_cell(n / total if total else 0.0) for n in row]
        extra = [str(log.hits[layer].sum()), str(log.misses[layer].sum())] if streamed else []
        table.add_row(str(layer), *cells, *extra)
    if streamed:
        hits, misses = int(log.hits.sum()), int(log.misses.sum())
        table.caption = (f"cache: {hits} hits, {misses} misses "
                         f"({100 * hits / max(1, hits + misses):.1f}% of expert requests served from memory)")
        table.caption_justify = "left"
    return table


def streaming_line(model) -> str | None:
    """Budget, cache use, hit rate and disk reads since the cache's stats were last reset."""
    cache = model.runtime.expert_cache
    if cache is None:
        return None
    s = cache.snapshot()
    low = (f", {gb(s.low_bit_bytes)} for {s.low_bit_reads} misses from the "
           f"{cache.low_bit.quantization[1]}-bit copy" if cache.low_bit is not None else "")
    return (f"experts: budget {gb(cache.plan.budget)}, {cache.cached_experts}/{cache.plan.total_experts} cached "
            f"({cache.policy}) | hit rate {100 * s.hit_rate:.1f}% of {s.requests} requests, prefetch recall "
            f"{100 * s.prefetch_recall:.1f}% | read {gb(s.bytes_read)} from disk{low}, "
            f"{s.wait_s:.1f} s spent waiting for reads")
