"""Mixtral hyper-parameters, read from a Hugging Face (or mlx-lm converted) `config.json`.

Every field the architecture uses is required or has the default Hugging Face itself uses, so a
config for another architecture, or a truncated one, fails here with a one-line error naming the
file and the field instead of failing later with a shape mismatch deep inside the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MixtralError
from .files import reason

# Fields without which the model cannot be built: no guessing.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
    "num_experts_per_tok",
)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    # mlx-lm's layout: {"group_size": 64, "bits": 4, "<module path>": {...} | false, ...}
    quantization: dict[str, Any] | None = None
    # Everything else in config.json, kept so a converted model's config round-trips.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Validate a config dict; `source` names the file in error messages."""
        model_type = raw.get("model_type")
        if model_type != "mixtral":
            raise MixtralError(
                f"{source}: model_type is {model_type!r}, not 'mixtral'; "
                "mlx-mixtral only runs Mixtral checkpoints"
            )
        for name in _REQUIRED:
            if raw.get(name) is None:
                raise MixtralError(f"{source}: missing field {name!r}; is this a complete Mixtral config?")
        heads = _positive_int(raw, "num_attention_heads", source)
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise MixtralError(
                f"{source}: num_attention_heads ({heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        hidden = _positive_int(raw, "hidden_size", source)
        head_dim = raw.get("head_dim") or hidden // heads
        experts = _positive_int(raw, "num_local_experts", source)
        top_k = _positive_int(raw, "num_experts_per_tok", source)
        if top_k > experts:
            raise MixtralError(
                f"{source}: num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})"
            )
        known = set(_REQUIRED) | {
            "model_type", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "rope_parameters", "max_position_embeddings", "sliding_window",
            "tie_word_embeddings", "quantization",
        }
        return cls(
            vocab_size=_positive_int(raw, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_positive_int(raw, "intermediate_size", source),
            num_hidden_layers=_positive_int(raw, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(raw, source),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 32768),
            sliding_window=raw.get("sliding_window") or None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            quantization=raw.get("quantization"),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise MixtralError(f"{path}: not found; a model folder needs its config.json") from None
        except OSError as e:
            raise MixtralError(f"cannot read {path}: {reason(e)}") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise MixtralError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise MixtralError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config in Hugging Face / mlx-lm spelling, ready to write as config.json."""
        out = dict(self.extra)
        out.update(
            model_type="mixtral",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            sliding_window=self.sliding_window,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.quantization is not None:
            out["quantization"] = self.quantization
            # Hugging Face tooling looks for this spelling; mlx-lm writes both.
            out["quantization_config"] = self.quantization
        else:
            out.pop("quantization_config", None)
        return out


def _positive_int(raw: dict[str, Any], name: str, source: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MixtralError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    return value


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    """rope_theta sits at the top level, or inside `rope_parameters` in newer transformers."""
    if raw.get("rope_theta") is not None:
        return float(raw["rope_theta"])
    params = raw.get("rope_parameters") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise MixtralError(
            f"{source}: rope_parameters.rope_type {params['rope_type']!r} is not supported "
            "(Mixtral uses plain RoPE)"
        )
    return float(params.get("rope_theta", 1e6))
