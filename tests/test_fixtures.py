"""Checks that the shared fixtures in conftest.py are what they claim to be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from checkpoints import (
    MIN_LOGIT_MARGIN,
    MIN_ROUTER_MARGIN,
    MLX_LM_COMPATIBLE,
    PROBE_NEW_TOKENS,
    PROBE_TOKENS,
    TINY_CONFIGS,
    _ensure_classic_layout,
)


def _st_info(folder: Path) -> dict[str, tuple[str, list[int], str]]:
    """key -> (dtype, shape, file name) over every safetensors file in folder."""
    from safetensors import safe_open

    info = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                assert k not in info, f"{k} in two files"
                info[k] = (sl.get_dtype(), list(sl.get_shape()), f.name)
    return info


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_tokenizer_model_path(tokenizer_model_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model_path))
    assert sp.get_piece_size() == 32000
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    text = "The quick brown fox jumps over the lazy dog. Once upon a time"
    assert [1] + sp.encode(text) == PROBE_TOKENS


def test_tiny_configs_cover_the_variants(tiny_configs):
    assert tiny_configs is TINY_CONFIGS
    assert {"gqa", "mha", "experts4_top1", "experts6_top3", "head_dim", "rope_theta",
            "sliding_window", "tied"} <= set(TINY_CONFIGS)
    for cfg in TINY_CONFIGS.values():
        assert cfg["vocab_size"] == 32000
        assert cfg["num_hidden_layers"] == 2
    assert len(PROBE_TOKENS) + PROBE_NEW_TOKENS > TINY_CONFIGS["sliding_window"]["sliding_window"]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_checkpoint_matches_config_and_has_margins(hf_checkpoint_factory, name):
    path = hf_checkpoint_factory(name)
    assert hf_checkpoint_factory(name) == path  # cached
    want = TINY_CONFIGS[name]
    cfg = _config(path)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
              "max_position_embeddings", "vocab_size", "tie_word_embeddings", "sliding_window"):
        assert cfg[k] == want[k], k
    assert cfg["rope_parameters"]["rope_theta"] == want["rope_theta"]
    assert cfg["dtype"] == "float32"
    assert (path / "tokenizer.model").is_file()
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"

    info = _st_info(path)
    E, H, I = want["num_local_experts"], want["hidden_size"], want["intermediate_size"]  # noqa: E741 (the paper's names)
    for layer in range(want["num_hidden_layers"]):
        p = f"model.layers.{layer}.block_sparse_moe"
        assert info[f"{p}.gate.weight"][1] == [E, H]
        for e in range(E):
            assert info[f"{p}.experts.{e}.w1.weight"][1] == [I, H]
            assert info[f"{p}.experts.{e}.w3.weight"][1] == [I, H]
            assert info[f"{p}.experts.{e}.w2.weight"][1] == [H, I]
        assert f"{p}.experts.{E}.w1.weight" not in info
    assert not any(".mlp." in k or "gate_up_proj" in k for k in info)
    assert {d for d, _, _ in info.values()} == {"F32"}
    assert ("lm_head.weight" in info) == (not want["tie_word_embeddings"])

    meta = hf_checkpoint_factory.meta(path)
    assert meta["name"] == name
    assert meta["min_logit_margin"] >= MIN_LOGIT_MARGIN
    assert meta["min_router_margin"] >= MIN_ROUTER_MARGIN
    assert 1.0 < meta["router_logit_std"] < 4.0  # routing is far from uniform
    assert len(meta["probe_greedy"]) == PROBE_NEW_TOKENS


def test_default_checkpoint_single_file_and_nontrivial_norms(hf_checkpoint_factory):
    from safetensors.numpy import load_file

    path = hf_checkpoint_factory()
    assert (path / "model.safetensors").is_file()
    assert not (path / "model.safetensors.index.json").exists()
    w = load_file(str(path / "model.safetensors"))
    assert not np.allclose(w["model.norm.weight"], 1.0)
    assert 0.2 < float(w["model.layers.0.self_attn.q_proj.weight"].std()) < 0.3


def test_bfloat16_checkpoint_is_rounded_float32(hf_checkpoint_factory):
    import torch
    from safetensors.torch import load_file

    p32 = hf_checkpoint_factory("gqa", "float32")
    p16 = hf_checkpoint_factory("gqa", "bfloat16")
    assert _config(p16)["dtype"] == "bfloat16"
    info = _st_info(p16)
    assert {d for d, _, _ in info.values()} == {"BF16"}
    w32, w16 = load_file(str(p32 / "model.safetensors")), load_file(str(p16 / "model.safetensors"))
    assert w32.keys() == w16.keys()
    for k in w32:
        assert torch.equal(w32[k].to(torch.bfloat16), w16[k]), k
    assert hf_checkpoint_factory.meta(p16)["min_logit_margin"] >= MIN_LOGIT_MARGIN


def test_sharded_checkpoint(hf_checkpoint_factory):
    path = hf_checkpoint_factory("gqa", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3
    assert all((path / f).is_file() for f in files)
    assert {p.name for p in path.glob("*.safetensors")} == files
    assert not (path / "model.safetensors").exists()
    info = _st_info(path)
    assert {k: v[2] for k, v in info.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] > 0
    # Same weights as the single-file checkpoint.
    single = _st_info(hf_checkpoint_factory("gqa"))
    assert {k: v[:2] for k, v in single.items()} == {k: v[:2] for k, v in info.items()}


def test_variant_specific_config_fields(hf_checkpoint_factory):
    cfg = _config(hf_checkpoint_factory("head_dim"))
    assert cfg["head_dim"] == 32 != cfg["hidden_size"] // cfg["num_attention_heads"]
    info = _st_info(hf_checkpoint_factory("head_dim"))
    assert info["model.layers.0.self_attn.q_proj.weight"][1] == [128, 64]
    assert info["model.layers.0.self_attn.k_proj.weight"][1] == [64, 64]
    assert info["model.layers.0.self_attn.o_proj.weight"][1] == [64, 128]
    assert _config(hf_checkpoint_factory("gqa"))["head_dim"] is None  # transformers 5 writes null

    cfg = _config(hf_checkpoint_factory("sliding_window"))
    assert cfg["sliding_window"] == 16 and cfg["max_position_embeddings"] == 128

    cfg = _config(hf_checkpoint_factory("rope_theta"))
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert "rope_theta" not in cfg


def test_legacy_config_style(hf_checkpoint_factory, hf_reference):
    legacy = hf_checkpoint_factory("rope_theta", config_style="legacy")
    cfg = _config(legacy)
    assert cfg["rope_theta"] == 10000.0 and cfg["torch_dtype"] == "float32"
    assert "rope_parameters" not in cfg and "dtype" not in cfg and "head_dim" not in cfg
    modern = hf_checkpoint_factory("rope_theta")
    tokens = PROBE_TOKENS[:8]
    np.testing.assert_array_equal(hf_reference.logits(legacy, tokens), hf_reference.logits(modern, tokens))


def test_hf_reference(hf_checkpoint_factory, hf_reference):
    path = hf_checkpoint_factory()
    one = hf_reference.logits(path, PROBE_TOKENS)
    assert one.shape == (1, len(PROBE_TOKENS), 32000) and one.dtype == np.float32
    batch = hf_reference.logits(path, [PROBE_TOKENS[:5], PROBE_TOKENS[5:10]])
    assert batch.shape == (2, 5, 32000)
    np.testing.assert_allclose(batch[0], one[0, :5], atol=1e-5)
    with pytest.raises(ValueError):
        hf_reference.logits(path, [[1, 2, 3], [1, 2]])
    greedy = hf_reference.greedy(path, PROBE_TOKENS, PROBE_NEW_TOKENS)
    assert greedy == hf_checkpoint_factory.meta(path)["probe_greedy"]
    assert hf_reference.greedy(path, PROBE_TOKENS, 3) == greedy[:3]
    assert greedy[0] == int(one[0, -1].argmax())


def test_ensure_classic_layout_rewrites_fused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    E, I, H = 3, 4, 2  # noqa: E741 (experts, intermediate, hidden)
    gate_up = torch.arange(E * 2 * I * H, dtype=torch.float32).reshape(E, 2 * I, H)
    down = -torch.arange(E * H * I, dtype=torch.float32).reshape(E, H, I)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": gate_up,
               "model.layers.0.mlp.experts.down_proj": down,
               "model.layers.0.mlp.gate.weight": torch.ones(E, H),
               "model.norm.weight": torch.ones(H)}, str(tmp_path / "model.safetensors"))
    assert _ensure_classic_layout(tmp_path, E)
    w = load_file(str(tmp_path / "model.safetensors"))
    p = "model.layers.0.block_sparse_moe"
    assert set(w) == {"model.norm.weight", f"{p}.gate.weight"} | {
        f"{p}.experts.{e}.{n}.weight" for e in range(E) for n in ("w1", "w2", "w3")}
    for e in range(E):
        assert torch.equal(w[f"{p}.experts.{e}.w1.weight"], gate_up[e, :I])
        assert torch.equal(w[f"{p}.experts.{e}.w3.weight"], gate_up[e, I:])
        assert torch.equal(w[f"{p}.experts.{e}.w2.weight"], down[e])
    assert not _ensure_classic_layout(tmp_path, E)  # idempotent


def test_mlx_lm_conversion_and_reference(hf_checkpoint_factory, hf_reference, mlx_lm_converted,
                                         mlx_lm_reference):
    hf = hf_checkpoint_factory()
    out = mlx_lm_converted(hf)
    assert mlx_lm_converted(hf) == out  # cached
    cfg = _config(out)
    assert "quantization" not in cfg
    info = _st_info(out)
    p = "model.layers.0.block_sparse_moe.switch_mlp"
    assert info[f"{p}.gate_proj.weight"][1] == [8, 128, 64]
    assert info[f"{p}.up_proj.weight"][1] == [8, 128, 64]
    assert info[f"{p}.down_proj.weight"][1] == [8, 64, 128]
    assert not any(".experts." in k for k in info)
    assert {d for d, _, _ in info.values()} == {"F32"}

    ref = hf_reference.logits(hf, PROBE_TOKENS)
    got = mlx_lm_reference.logits(out, PROBE_TOKENS)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4)

    _, tokenizer = mlx_lm_reference.load(out)
    text = "The quick brown fox jumps over the lazy dog. Once upon a time"
    assert tokenizer.encode(text) == PROBE_TOKENS


def test_mlx_lm_quantized_conversion(hf_checkpoint_factory, mlx_lm_converted, mlx_lm_reference,
                                     hf_reference):
    hf = hf_checkpoint_factory()
    out = mlx_lm_converted(hf, quantize=True, bits=4, group_size=32)
    cfg = _config(out)
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    info = _st_info(out)
    p = "model.layers.0.block_sparse_moe.switch_mlp"
    assert info[f"{p}.gate_proj.weight"] == ("U32", [8, 128, 64 * 4 // 32], info[f"{p}.gate_proj.weight"][2])
    assert info[f"{p}.gate_proj.scales"][:2] == ("F32", [8, 128, 64 // 32])
    assert f"{p}.down_proj.biases" in info
    # mlx-lm also quantizes the router and the embedding.
    assert "model.layers.0.block_sparse_moe.gate.scales" in info
    assert "model.embed_tokens.scales" in info
    got = mlx_lm_reference.logits(out, PROBE_TOKENS)
    ref = hf_reference.logits(hf, PROBE_TOKENS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() > 1e-3  # quantization changes the numbers...
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.5  # ...but not beyond recognition


def test_mlx_lm_reads_patched_rope_theta(hf_checkpoint_factory, hf_reference, mlx_lm_converted,
                                         mlx_lm_reference):
    assert "rope_theta" in MLX_LM_COMPATIBLE
    hf = hf_checkpoint_factory("rope_theta")
    out = mlx_lm_converted(hf)
    assert _config(out)["rope_theta"] == 10000.0
    np.testing.assert_allclose(mlx_lm_reference.logits(out, PROBE_TOKENS),
                               hf_reference.logits(hf, PROBE_TOKENS), atol=1e-4)
