"""Fixtures: tiny random Mixtral checkpoints and the reference implementations (see `checkpoints`,
which builds them and documents each; tests import constants and helpers from there, not here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from checkpoints import (
    PROBE_TOKENS,
    TINY_CONFIGS,
    HFCheckpointFactory,
    HFReference,
    MlxLmConverter,
    MlxLmReference,
    tokenizer_model_file,
)

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_model_path() -> Path:
    path = tokenizer_model_file()
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_model_path: Path):
    """Our tokenizer on the real Mixtral tokenizer.model."""
    from mlx_mixtral.tokenizer import Tokenizer

    return Tokenizer(tokenizer_model_path)


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, dict[str, Any]]:
    return TINY_CONFIGS


@pytest.fixture(scope="session")
def probe_tokens() -> list[int]:
    return list(PROBE_TOKENS)


@pytest.fixture(scope="session")
def hf_checkpoint_factory(tmp_path_factory) -> HFCheckpointFactory:
    return HFCheckpointFactory(tmp_path_factory.mktemp("hf_checkpoints"))


@pytest.fixture(scope="session")
def hf_reference() -> HFReference:
    return HFReference()


@pytest.fixture(scope="session")
def mlx_lm_converted(tmp_path_factory) -> MlxLmConverter:
    return MlxLmConverter(tmp_path_factory.mktemp("mlx_lm_converted"))


@pytest.fixture(scope="session")
def mlx_lm_reference() -> MlxLmReference:
    return MlxLmReference()
