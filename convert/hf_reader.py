"""The converter's input: a Mixtral checkpoint, validated completely before anything is written.

Thin on purpose: the loader's own pieces (`resolve`, `ModelConfig`, `Checkpoint`, `build_model`,
`check_tensors`) read and check it, so the converter accepts exactly what `mlx_mixtral.load`
accepts (a Hugging Face folder or hub repo id, or an MLX folder, float or quantized, ours or
mlx-lm's) and rejects a broken one with the same one-line errors, in a second, from the headers.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_mixtral.checkpoint import Checkpoint
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.loading import build_model, check_tensors, resolve
from mlx_mixtral.model import Mixtral

# Copied as they are: ours and mlx-lm's (via transformers) tokenizer loading read these.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
_HEADER_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}


@dataclass
class Source:
    """A validated checkpoint: its config, its lazily read tensors, and the module tree they fill."""

    folder: Path
    config: ModelConfig
    checkpoint: Checkpoint
    model: Mixtral  # nothing allocated: only names, shapes and each module's quantization

    @property
    def nbytes(self) -> int:
        return self.checkpoint.nbytes

    def float_dtype(self) -> mx.Dtype:
        """The dtype most floating-point bytes are stored in (bfloat16 for Mixtral's release)."""
        by_dtype: Counter[str] = Counter()
        for header in self.checkpoint.headers.values():
            for tensor in header.values():
                if tensor["dtype"] in _HEADER_DTYPES:
                    start, end = tensor["data_offsets"]
                    by_dtype[tensor["dtype"]] += end - start
        return _HEADER_DTYPES[by_dtype.most_common(1)[0][0]] if by_dtype else mx.float32

    def quantized(self) -> dict[str, tuple[int, int, str]]:
        """Modules stored quantized: path -> (group_size, bits, mode)."""
        return {path: (m.group_size, m.bits, m.mode) for path, m in self.model.named_modules() if "scales" in m}

    def pieces(self) -> Iterator[tuple[str, dict[str, mx.array]]]:
        """("embeddings", tensors) then ("layer N", tensors), MLX layout, lazily read."""
        return self.checkpoint.iter_weights(self.config)

    def copy_tokenizer(self, dst: Path) -> None:
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, dst / name)  # follows the hub cache's symlinks


def open_source(path_or_repo: str | os.PathLike) -> Source:
    """Resolve (downloading from the hub if needed) and check the config, every header and every shape."""
    folder = resolve(path_or_repo)
    config = ModelConfig.from_file(folder / "config.json")
    checkpoint = Checkpoint(folder)
    shapes = checkpoint.mlx_shapes(config)
    model = build_model(config, shapes)
    check_tensors(model, checkpoint, shapes)
    return Source(folder, config, checkpoint, model)
