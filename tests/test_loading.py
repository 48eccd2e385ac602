"""Loading: the accepted folder layouts, mlx-lm compatibility, and a one-line error for each broken input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_mixtral
from mlx_mixtral import MixtralError
from mlx_mixtral.config import ModelConfig

from checkpoints import PROBE_TOKENS


@pytest.fixture
def broken(tmp_path, hf_checkpoint_factory):
    """A private, editable copy of a sharded checkpoint."""

    def copy(shards: int = 3) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(hf_checkpoint_factory("gqa", shards=shards), dst)
        return dst

    return copy


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _load_error(folder) -> str:
    with pytest.raises(MixtralError) as e:
        mlx_mixtral.load(folder, progress=False)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("quantize", [False, True])
def test_loads_what_mlx_lm_convert_writes(quantize, hf_checkpoint_factory, mlx_lm_converted, mlx_lm_reference):
    path = mlx_lm_converted(hf_checkpoint_factory("gqa"), quantize=quantize, bits=4, group_size=32)
    model, _ = mlx_mixtral.load(path, progress=False)
    ours = np.array(model(mx.array([PROBE_TOKENS])))
    ref = mlx_lm_reference.logits(path, [PROBE_TOKENS])
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("recipe,group_size", [("mixed_3_6", 32), (None, 128)])
def test_loads_mlx_lm_mixed_recipes_and_float_misfits(recipe, group_size, hf_checkpoint_factory, mlx_lm_converted,
                                                      mlx_lm_reference):
    """mlx-lm's per-layer `quantization` entries (its mixed recipes), and layers it left float
    because their width (64) is not a multiple of the group size (128)."""
    path = mlx_lm_converted(hf_checkpoint_factory("gqa"), quantize=True, bits=4, group_size=group_size, recipe=recipe)
    q = json.loads((path / "config.json").read_text())["quantization"]
    model, _ = mlx_mixtral.load(path, progress=False)
    if recipe:
        widths = {v["bits"] for v in q.values() if isinstance(v, dict)}
        assert {3, 6} <= widths  # really mixed
        bits = {m.bits for _, m in model.named_modules() if hasattr(m, "bits")}
        assert {3, 6} <= bits
    else:
        assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)  # input 64: float
        assert model.layers[0].block_sparse_moe.switch_mlp.down_proj.bits == 4  # input 128: quantized
    ours = np.array(model(mx.array([PROBE_TOKENS])))
    assert np.abs(ours - mlx_lm_reference.logits(path, [PROBE_TOKENS])).max() < 1e-4


def test_mixed_bit_widths_are_inferred_from_shapes(hf_checkpoint_factory, tmp_path):
    """A folder whose config states only the default bits: each layer's width comes from its shapes."""
    from convert.convert import convert

    out = convert(hf_checkpoint_factory("gqa"), tmp_path / "q4a8", quantize=True, bits=4, attention_bits=8,
                  group_size=32, dtype="float32", progress=False).path
    reference = np.array(mlx_mixtral.load(out, progress=False)[0](mx.array([PROBE_TOKENS])))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"] = {k: v for k, v in cfg["quantization"].items() if k in ("bits", "group_size", "mode")}
    (out / "config.json").write_text(json.dumps(cfg))
    model, _ = mlx_mixtral.load(out, progress=False)
    assert model.layers[1].self_attn.v_proj.bits == 8 and model.layers[1].block_sparse_moe.switch_mlp.up_proj.bits == 4
    assert model.layers[0].block_sparse_moe.gate.weight.dtype == mx.float32  # the float router too
    np.testing.assert_array_equal(np.array(model(mx.array([PROBE_TOKENS]))), reference)


def test_tied_embeddings_quantized(hf_checkpoint_factory, hf_reference, mlx_lm_reference, tmp_path):
    from convert.convert import convert

    src = hf_checkpoint_factory("tied")
    out = convert(src, tmp_path / "tied-q8", quantize=True, bits=8, group_size=32, dtype="float32", progress=False).path
    assert not any("lm_head" in k for f in out.glob("*.safetensors") for k in mx.load(str(f)))
    model, _ = mlx_mixtral.load(out, progress=False)
    assert model.model.embed_tokens.bits == 8
    ours = np.array(model(mx.array([PROBE_TOKENS])))
    np.testing.assert_allclose(ours, mlx_lm_reference.logits(out, [PROBE_TOKENS]), atol=1e-4)
    ref = hf_reference.logits(src, [PROBE_TOKENS])
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_loads_mlx_lm_bfloat16_scales_as_float32_on_cpu(hf_checkpoint_factory, mlx_lm_converted):
    """mlx-lm's default keeps bf16 scales; on the CPU we widen them (same numbers, far faster
    there); a GPU keeps them in bf16, its fast path (device.compute_dtype)."""
    path = mlx_lm_converted(hf_checkpoint_factory("gqa"), quantize=True, bits=8, group_size=32, dtype="bfloat16")
    model, _ = mlx_mixtral.load(path, progress=False)
    switch = model.layers[0].block_sparse_moe.switch_mlp.gate_proj
    on_cpu = mx.default_device() == mx.cpu
    assert switch.bits == 8 and switch.scales.dtype == (mx.float32 if on_cpu else mx.bfloat16)
    if not on_cpu:
        return  # the comparison below is of float32 arithmetic
    ours = np.array(model(mx.array([PROBE_TOKENS])))
    # mlx-lm computes in bfloat16, whose rounding alone moves these random logits by a lot; the
    # claim is "same weights, wider arithmetic", so compare with mlx-lm's model widened the same way.
    from mlx_lm import load as mlx_lm_load  # a fresh copy: the fixture's cached model stays bf16

    ref_model, _ = mlx_lm_load(str(path))
    widened = [(k, v.astype(mx.float32)) for k, v in tree_flatten(ref_model.parameters()) if v.dtype == mx.bfloat16]
    ref_model.load_weights(widened, strict=False)
    ref = np.array(ref_model(mx.array([PROBE_TOKENS])))
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()


def test_rope_buffers_in_the_checkpoint_are_ignored(broken, hf_checkpoint_factory):
    """Some checkpoints carry `rotary_emb.inv_freq` buffers (older transformers saved them)."""
    folder = broken(1)
    file = folder / "model.safetensors"
    tensors = mx.load(str(file))
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = mx.ones(8)
    mx.save_safetensors(str(file), tensors, metadata={"format": "pt"})
    model, _ = mlx_mixtral.load(folder, progress=False)
    clean, _ = mlx_mixtral.load(hf_checkpoint_factory("gqa", shards=1), progress=False)
    tokens = mx.array([PROBE_TOKENS])
    assert mx.array_equal(model(tokens), clean(tokens))


def test_not_a_mixtral_config(broken):
    folder = broken(1)
    _edit_config(folder, model_type="llama")
    message = _load_error(folder)
    assert "config.json" in message and "llama" in message


@pytest.mark.parametrize("field", ["num_local_experts", "hidden_size", "vocab_size"])
def test_missing_config_field(broken, field):
    folder = broken(1)
    _edit_config(folder, **{field: None})
    message = _load_error(folder)
    assert "config.json" in message and field in message


def test_missing_shard(broken):
    folder = broken()
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert victim.name in _load_error(folder)


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_shard(broken, damage):
    folder = broken()
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) - 100])
    elif damage == "header":
        victim.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        victim.write_bytes(b"")
    message = _load_error(folder)
    assert victim.name in message and ("truncated" in message or "corrupt" in message)


def test_shape_disagrees_with_config(broken):
    folder = broken(1)
    _edit_config(folder, intermediate_size=96)
    message = _load_error(folder)
    assert "model.safetensors" in message and "shape" in message


def test_fewer_layers_in_weights_than_config(broken):
    folder = broken(1)
    _edit_config(folder, num_hidden_layers=3)
    assert "model.layers.2" in _load_error(folder)


def test_more_layers_in_weights_than_config(broken):
    folder = broken(1)
    _edit_config(folder, num_hidden_layers=1)
    message = _load_error(folder)
    assert "unexpected tensor model.layers.1." in message and "config.json" in message


def test_fewer_experts_in_weights_than_config(broken):
    folder = broken(1)
    _edit_config(folder, num_local_experts=16)
    message = _load_error(folder)
    assert message.endswith("model.safetensors: tensor model.layers.0.block_sparse_moe.gate.weight has shape "
                            "[8, 64], but config.json implies [16, 64]; the weights do not match the config")


@pytest.mark.parametrize("damage", ["{not json", '{"weight_map": 3}', '{"metadata": {}}'])
def test_broken_index_json(broken, damage):
    folder = broken()
    (folder / "model.safetensors.index.json").write_text(damage)
    assert "model.safetensors.index.json" in _load_error(folder)


def test_missing_tokenizer(broken):
    folder = broken(1)
    (folder / "tokenizer.model").unlink()
    assert "tokenizer.model" in _load_error(folder)


def test_missing_folder_and_bad_repo_id(tmp_path):
    assert "no such folder" in _load_error(tmp_path / "nope")
    # A repo id with the hub unreachable (tests run offline) is one line too.
    assert "hub" in _load_error("nobody-here/not-a-model")


def test_config_reads_every_field(hf_checkpoint_factory):
    cfg = ModelConfig.from_file(hf_checkpoint_factory("head_dim") / "config.json")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 32)
    cfg = ModelConfig.from_file(hf_checkpoint_factory("sliding_window") / "config.json")
    assert cfg.sliding_window == 16 and cfg.max_position_embeddings == 128
    cfg = ModelConfig.from_file(hf_checkpoint_factory("rope_theta") / "config.json")  # rope_parameters
    assert cfg.rope_theta == 1e4
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_the_suite_is_offline_whatever_the_caller_set():
    """conftest forces HF_HUB_OFFLINE, also for a huggingface_hub imported before it."""
    code = ("import huggingface_hub.constants as c, conftest, os; "
            "print(c.HF_HUB_OFFLINE, os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent, env=dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0"))
    assert done.stdout.split() == ["True", "1", "1"], done.stderr
