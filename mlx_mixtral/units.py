"""Sizes as people write and read them: "12GB", "11.5GiB", "500MB" in; "26.40 GB" out.

One parser and one formatter for every flag and message (`--max-memory`, `--max-shard-size`,
`--prompt-cache-size`, the converter's summary): decimal units as disk makers and Hugging Face use,
binary ones when asked for by name.
"""

from __future__ import annotations

import re

from .errors import MixtralError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int, what: str = "--max-memory", example: str = "12GB, 11.5GiB or 800MB") -> int:
    """'12GB', '12G', '11.5GiB', '500MB', '1.5 KB', or a number of bytes -> bytes (positive)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise MixtralError(f"{what} {text!r} is not a size; write it like {example}")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MixtralError(f"{what} must be positive, got {text!r}")
    return value


def gb(n: float) -> str:
    """A byte count for people: GB with two decimals, MB or KB below that."""
    for unit, size in (("GB", 10**9), ("MB", 10**6)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e3:.1f} KB"
