"""Tiny random Mixtral checkpoints in Hugging Face format, and the references to check them against.

The test helpers behind the fixtures in `conftest.py` (which only wires them up): tests use the
fixtures, and import the constants and functions from here (`from checkpoints import PROBE_TOKENS`).

Everything here is built offline (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` are set when
this module is imported) and cached once per test session under ``tmp_path_factory``.  Heavy
imports (torch, transformers, mlx_lm) happen lazily inside the fixtures, so tests that don't use
them don't pay for them.

Names importable from tests (``from checkpoints import TINY_CONFIGS, PROBE_TOKENS``; pytest puts
``tests/`` on ``sys.path``) -- each is also available as a fixture of the same lower-case name:

``TINY_CONFIGS: dict[str, dict]``
    ``transformers.MixtralConfig`` kwargs for named variants.  All use the real 32000-piece
    Mixtral tokenizer vocabulary, hidden 64, intermediate 128, 2 layers, rms_norm_eps 1e-5:

    ==================  ==========================================================================
    ``gqa`` (default)   8 heads / 2 kv heads (head_dim 8), 8 experts top-2, rope_theta 1e6, 512 pos
    ``mha``             4 heads / 4 kv heads (head_dim 16)
    ``mqa``             8 heads / 1 kv head (multi-query attention)
    ``experts4_top1``   4 experts, top-1
    ``experts6_top3``   6 experts, top-3
    ``head_dim``        4 heads / 2 kv heads with explicit head_dim 32 (!= 64 / 4): q_proj is
                        [128, 64], k/v_proj [64, 64], o_proj [64, 128]
    ``rope_theta``      rope_theta 1e4 instead of 1e6
    ``sliding_window``  sliding_window 16, max_position_embeddings 128
    ``tied``            tie_word_embeddings=True: no ``lm_head.weight`` on disk
    ==================  ==========================================================================

    mlx-lm 0.32's ``mixtral`` model ignores ``head_dim`` (uses hidden/heads, so it fails to load
    the ``head_dim`` variant) and ``sliding_window`` (full causal attention), and reads only a
    top-level ``rope_theta``; it is a valid reference only for the names in
    ``MLX_LM_COMPATIBLE`` (see ``mlx_lm_converted``, which patches ``rope_theta`` for it).

``PROBE_TOKENS: list[int]`` / ``PROBE_NEW_TOKENS: int``
    BOS + "The quick brown fox jumps over the lazy dog. Once upon a time" (17 ids) and 24.
    Every checkpoint's seed was chosen so that the greedy continuation of ``PROBE_TOKENS`` for
    ``PROBE_NEW_TOKENS`` steps has a top-1/top-2 logit margin >= ``MIN_LOGIT_MARGIN`` at every
    step and every router decision on that sequence (all layers) has a k-th/(k+1)-th router logit
    gap >= ``MIN_ROUTER_MARGIN``, in float32 and with bf16-rounded weights.  Greedy-equality
    tests should use this prompt (or prefixes of the probe path) and at most that many tokens;
    other prompts work but carry no margin guarantee.  17 + 24 = 41 > 16, so the probe path
    exercises the sliding window.

Fixtures (all session-scoped):

``tokenizer_model_path -> Path``
    ``mistral_common/data/tokenizer.model.v1``: the real Mixtral sentencepiece model.

``hf_checkpoint_factory(name="gqa", dtype="float32", shards=1, config_style="transformers") -> Path``
    A random tiny Mixtral saved with ``MixtralForCausalLM.save_pretrained``; cached per
    arguments.  ``dtype`` is ``"float32"`` or ``"bfloat16"`` (the bf16 checkpoint holds exactly
    the bf16-rounded float32 weights of the same name).  ``shards > 1`` picks ``max_shard_size``
    so that save_pretrained writes several ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` (the 8.2 MB embedding always sits alone; N is usually a bit
    more than ``shards``).  The folder also holds the real ``tokenizer.model`` and a
    ``tokenizer_config.json`` (LlamaTokenizer, legacy, <s> </s> <unk>) with which mlx-lm / HF
    load the tokenizer offline, plus ``generation_config.json`` as transformers writes it.

    Weights: every matrix ~ N(0, ``INIT_STD`` = 0.25) (so router and final logits spread ~2,
    otherwise routing is near-uniform and greedy tests flaky); every RMSNorm weight ~ U(0.5, 1.5)
    (not all-ones, so a loader that drops norm weights is caught).  Seeds come from
    ``_KNOWN_SEEDS`` (verified at build time); failing that, the search starts at
    ``zlib.crc32(name)`` and goes up until the margins above hold.
    ``hf_checkpoint_factory.meta(path)`` returns ``{"name", "seed", "probe_greedy",
    "min_logit_margin", "min_router_margin", "router_logit_std", ...}``.

    What transformers 5.24 writes (verified by tests/test_fixtures.py):
      * keys are the classic per-expert layout even though the in-memory model has fused
        ``mlp.experts.gate_up_proj`` / ``down_proj``:
        ``model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight`` (w1 = gate [I, H],
        w3 = up [I, H], w2 = down [H, I]) and ``model.layers.N.block_sparse_moe.gate.weight``.
        (If a transformers version ever writes fused tensors, ``_ensure_classic_layout``
        rewrites them into that layout.)
      * config.json (``config_style="transformers"``): ``"dtype": "float32"|"bfloat16"``
        (no ``torch_dtype``), ``"rope_parameters": {"rope_theta": ..., "rope_type": "default"}``
        (no top-level ``rope_theta``), ``"head_dim": null`` unless explicit, ``"sliding_window":
        null|16``, ``"tie_word_embeddings"``, ``"transformers_version": "5.x"``.
      * index.json ``metadata`` has ``total_size`` and ``total_parameters``.
    ``config_style="legacy"`` rewrites config.json like the real Mixtral-8x7B repos:
    top-level ``rope_theta``, ``torch_dtype``, no ``rope_parameters``, no ``dtype``, no null
    ``head_dim`` (transformers 5 still loads it and moves rope_theta into rope_parameters).

``hf_reference``: ``.logits(path, tokens) -> np.ndarray float32 [batch, len, vocab]``
    (``tokens`` a list of ids or a list of equal-length lists) and
    ``.greedy(path, prompt_tokens, n) -> list[int]`` (n new tokens, argmax, no EOS stop, full
    recompute each step -- no KV cache involved).  The checkpoint is loaded with transformers in
    float32 with eager attention; models are cached per path.  ``.model(path)`` gives the torch
    model itself.

``mlx_lm_converted(hf_path, quantize=False, bits=4, group_size=32, dtype="float32") -> Path``
    Runs ``python -m mlx_lm convert --hf-path IN --mlx-path OUT --dtype DTYPE [-q --q-bits B
    --q-group-size G]`` in a subprocess (HF_HUB_OFFLINE=1), cached per arguments
    (``dtype=None`` omits ``--dtype``: mlx-lm's own default).  Output: ``model.safetensors`` +
    ``model.safetensors.index.json`` (even for one file), ``config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``generation_config.json``, ``README.md`` -- no
    ``tokenizer.model``.  Keys: ``model.layers.N.block_sparse_moe.switch_mlp.{gate,up,down}_proj
    .weight`` [E, out, in] (+ ``.scales``/``.biases`` when quantized, weight packed as uint32
    [E, out, in*bits/32]) and ``block_sparse_moe.gate.weight``; config.json gets both
    ``"quantization"`` and ``"quantization_config"``: ``{"group_size", "bits", "mode": "affine"}``.
    Surprises: mlx-lm quantizes every Linear/Embedding whose input width is a multiple of the
    group size -- including the router ``gate`` and ``embed_tokens`` -- and silently leaves the
    others in float; scales/biases take the ``--dtype`` (its default, the checkpoint's
    ``torch_dtype``, would give bf16 scales which are ~8x slower on the CPU backend); it reads
    ``torch_dtype`` only, not transformers 5's ``dtype``.  Because mlx-lm ignores
    ``rope_parameters``, this fixture adds a top-level ``rope_theta`` to the output config.json
    when it is missing (otherwise mlx-lm silently uses 1e6).

``mlx_lm_reference``: ``.logits(mlx_path, tokens) -> np.ndarray float32 [batch, len, vocab]``
    ``mlx_lm.load`` + a plain forward (no cache) in-process; models cached per path.
    ``.load(mlx_path) -> (model, tokenizer)``.

Build cost on the 2-core dev box (torch runs single-threaded inside these fixtures, which is
~5x faster for such tiny models when the box is busy): one checkpoint ~1-3 s (two margin checks
of 25 forwards each, plus a one-time ~5-15 s torch/transformers import); one mlx-lm conversion
~6-18 s, nearly all of it the subprocess importing mlx_lm + transformers.  tests/test_fixtures.py
builds all 8 variants, 3 conversions and runs in ~95 s with a load average of ~7.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

# Forced, not defaulted: tests never reach the network, whatever the caller's environment says
# (huggingface_hub reads the variable once, at import, so a copy imported earlier is told too).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "huggingface_hub.constants" in sys.modules:
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from tokenizer_folders import INSTRUCT_V1_TEMPLATE

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

INIT_STD = 0.25
MIN_LOGIT_MARGIN = 0.02
MIN_ROUTER_MARGIN = 0.01
MAX_SEED_TRIES = 200

# BOS + sentencepiece("The quick brown fox jumps over the lazy dog. Once upon a time")
PROBE_TOKENS: list[int] = [
    1, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272, 17898, 3914, 28723, 5713, 3714, 264, 727,
]
PROBE_NEW_TOKENS = 24

_BASE: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    sliding_window=None,
    tie_word_embeddings=False,
    initializer_range=INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa": dict(_BASE),
    "mha": {**_BASE, "num_attention_heads": 4, "num_key_value_heads": 4},
    "mqa": {**_BASE, "num_key_value_heads": 1},
    "experts4_top1": {**_BASE, "num_local_experts": 4, "num_experts_per_tok": 1},
    "experts6_top3": {**_BASE, "num_local_experts": 6, "num_experts_per_tok": 3},
    "head_dim": {**_BASE, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
    "rope_theta": {**_BASE, "rope_theta": 10000.0},
    "sliding_window": {**_BASE, "sliding_window": 16, "max_position_embeddings": 128},
    "tied": {**_BASE, "tie_word_embeddings": True},
}

# Seeds that pass the margin checks with torch 2.13 / transformers 5.24 (found by the search in
# HFCheckpointFactory._pick_seed, which starts at zlib.crc32(name)); a known seed is verified at
# build time and the search runs only if it fails (e.g. other library versions: ~1-4 min).
_KNOWN_SEEDS: dict[str, int] = {
    "gqa": 3192397288,
    "mha": 685715724,
    "experts4_top1": 542254147,
    "experts6_top3": 2207573028,
    "head_dim": 1261747075,
    "rope_theta": 3620750929,
    "sliding_window": 181150507,
    "tied": 3494519555,
}

# Variants for which mlx-lm 0.32's mixtral model is a faithful reference.
MLX_LM_COMPATIBLE = ("gqa", "mha", "experts4_top1", "experts6_top3", "rope_theta", "tied")

# Mixtral-8x7B-Instruct-v0.1's template as the hub ships it (one copy, in tokenizer_folders).
INSTRUCT_TEMPLATE = INSTRUCT_V1_TEMPLATE

TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 32768,
    # Mixtral-8x7B-Instruct-v0.1's template as the hub ships it: it marks the folder as the Instruct
    # model (a folder without a template is a base model), whose prompts follow mistral-common.
    "chat_template": INSTRUCT_TEMPLATE,
}


def tokenizer_model_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


# --------------------------------------------------------------------------------------------
# Building checkpoints
# --------------------------------------------------------------------------------------------


def bf16_logit_atol(reference: np.ndarray) -> float:
    """How far our logits for a bfloat16 checkpoint may be from transformers' float32 run on the
    same (bf16-rounded) weights. The CPU backend widens bf16 weights to float32 (`device.
    compute_dtype`), so the arithmetic is the same and only summation order differs; a GPU
    computes in bf16 (8-bit mantissa), which moves these random logits by a few percent."""
    import mlx.core as mx

    from mlx_mixtral.device import compute_dtype

    if compute_dtype(mx.bfloat16) == mx.float32:
        return 1e-4
    return 0.05 * float(np.abs(reference).max())


@contextlib.contextmanager
def _torch_threads(n: int = 1):
    """Run torch single-threaded: for these tiny models per-op threading overhead dominates, and
    on a busy 2-core box one thread is ~5x faster than two.  The previous setting is restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _is_norm(param_name: str) -> bool:
    return param_name.endswith("norm.weight")


def _randomize(model, seed: int) -> None:
    """Overwrite every parameter deterministically from ``seed`` (independent of HF init)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if _is_norm(pname):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float32))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * INIT_STD)


def _probe_margins(model, top_k: int) -> dict[str, Any]:
    """Greedy-decode the probe prompt and measure logit / router margins along the path."""
    import torch

    seq = list(PROBE_TOKENS)
    with torch.no_grad():
        for _ in range(PROBE_NEW_TOKENS):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
        out = model(torch.tensor([seq]), output_router_logits=True)
    logits = out.logits[0].float()
    decision = logits[len(PROBE_TOKENS) - 1 : len(seq) - 1]  # positions that chose new tokens
    top2 = torch.topk(decision, 2, dim=-1).values
    logit_margin = float((top2[:, 0] - top2[:, 1]).min())
    router_margin = float("inf")
    stds = []
    for rl in out.router_logits:
        rl = rl.float().reshape(-1, rl.shape[-1])
        stds.append(float(rl.std()))
        v = torch.sort(rl, dim=-1, descending=True).values
        if top_k < rl.shape[-1]:
            router_margin = min(router_margin, float((v[:, top_k - 1] - v[:, top_k]).min()))
    return {
        "probe_greedy": seq[len(PROBE_TOKENS) :],
        "min_logit_margin": logit_margin,
        "min_router_margin": router_margin,
        "router_logit_std": float(np.mean(stds)),
    }


def _ensure_classic_layout(folder: Path, num_experts: int) -> bool:
    """Rewrite fused expert tensors (if any) into the classic per-expert Mixtral layout.

    ``...mlp.experts.gate_up_proj`` [E, 2I, H] -> ``...block_sparse_moe.experts.e.w1`` (first I
    rows, gate) and ``w3`` (last I rows, up); ``...mlp.experts.down_proj`` [E, H, I] -> ``w2``;
    ``...mlp.gate.weight`` -> ``...block_sparse_moe.gate.weight``.  Each shard is rewritten in
    place and the index updated.  Returns whether anything changed.  transformers 5.24 already
    writes the classic layout, so this is normally a no-op.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(folder.glob("*.safetensors"))
    changed_any = False
    renames: dict[str, str] = {}  # new key -> file name
    for f in files:
        with safe_open(str(f), "pt") as sf:
            keys = list(sf.keys())
            metadata = sf.metadata() or {"format": "pt"}
            if not any(".mlp." in k for k in keys):
                continue
            tensors = {k: sf.get_tensor(k) for k in keys}
        out = {}
        for k, t in tensors.items():
            if k.endswith(".mlp.experts.gate_up_proj"):
                prefix = k[: -len(".mlp.experts.gate_up_proj")] + ".block_sparse_moe.experts"
                inter = t.shape[1] // 2
                for e in range(num_experts):
                    out[f"{prefix}.{e}.w1.weight"] = t[e, :inter].contiguous()
                    out[f"{prefix}.{e}.w3.weight"] = t[e, inter:].contiguous()
            elif k.endswith(".mlp.experts.down_proj"):
                prefix = k[: -len(".mlp.experts.down_proj")] + ".block_sparse_moe.experts"
                for e in range(num_experts):
                    out[f"{prefix}.{e}.w2.weight"] = t[e].contiguous()
            elif ".mlp.gate." in k:
                out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
            else:
                out[k] = t
        save_file(out, str(f), metadata=metadata)
        renames.update({k: f.name for k in out})
        changed_any = True
    index = folder / "model.safetensors.index.json"
    if changed_any and index.exists():
        data = json.loads(index.read_text())
        wm = {k: v for k, v in data["weight_map"].items() if ".mlp." not in k}
        wm.update(renames)
        data["weight_map"] = dict(sorted(wm.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")
    return changed_any


def _legacy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters", None) or {}
    dtype = cfg.pop("dtype", None)
    if cfg.get("head_dim", 0) is None:
        cfg.pop("head_dim")
    cfg["rope_theta"] = rope.get("rope_theta", 1e6)
    if dtype is not None:
        cfg["torch_dtype"] = dtype
    return dict(sorted(cfg.items()))


class HFCheckpointFactory:
    """Callable ``(name="gqa", dtype="float32", shards=1, config_style="transformers") -> Path``."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[tuple, Path] = {}
        self._seeds: dict[str, tuple[int, dict, dict]] = {}
        self._meta: dict[Path, dict] = {}

    # -- seed search -------------------------------------------------------------------------
    def _model(self, name: str, seed: int):
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(**TINY_CONFIGS[name])
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config).eval()
        _randomize(model, seed)
        return model

    def _pick_seed(self, name: str) -> tuple[int, dict, dict]:
        import torch

        if name in self._seeds:
            return self._seeds[name]
        top_k = TINY_CONFIGS[name]["num_experts_per_tok"]
        seed0 = zlib.crc32(name.encode())
        candidates = list(range(seed0, seed0 + MAX_SEED_TRIES))
        if name in _KNOWN_SEEDS:
            candidates.insert(0, _KNOWN_SEEDS[name])
        for seed in candidates:
            model = self._model(name, seed)
            m32 = _probe_margins(model, top_k)
            if not self._ok(m32):
                continue
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
            m16 = _probe_margins(model, top_k)
            if self._ok(m16):
                self._seeds[name] = (seed, m32, m16)
                return self._seeds[name]
        raise RuntimeError(f"no seed with decent margins for {name!r} in {MAX_SEED_TRIES} tries")

    @staticmethod
    def _ok(m: dict) -> bool:
        return m["min_logit_margin"] >= MIN_LOGIT_MARGIN and m["min_router_margin"] >= MIN_ROUTER_MARGIN

    # -- building ------------------------------------------------------------------------------
    def __call__(
        self, name: str = "gqa", dtype: str = "float32", shards: int = 1, config_style: str = "transformers"
    ) -> Path:
        if name not in TINY_CONFIGS:
            raise KeyError(f"unknown tiny config {name!r}; choose from {sorted(TINY_CONFIGS)}")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
        if config_style not in ("transformers", "legacy"):
            raise ValueError(f"config_style must be 'transformers' or 'legacy', not {config_style!r}")
        if shards < 1:
            raise ValueError("shards must be >= 1")
        key = (name, dtype, shards, config_style)
        if key in self._cache:
            return self._cache[key]
        folder = self.root / f"{name}-{dtype}-s{shards}-{config_style}"
        with _torch_threads(1):
            self._build(folder, name, dtype, shards, config_style)
        self._cache[key] = folder
        return folder

    def _build(self, folder: Path, name: str, dtype: str, shards: int, config_style: str) -> None:
        import torch

        seed, m32, m16 = self._pick_seed(name)
        model = self._model(name, seed)
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
        if shards == 1:
            max_shard = sum(sizes.values()) + 1
        else:
            # The embedding (and lm_head) are far bigger than everything else and get a shard of
            # their own; split the remaining tensors over `shards - 1` files.
            big = max(sizes.values())
            small = [s for s in sizes.values() if s * 4 < big]
            max_shard = max(max(small), sum(small) // max(1, shards - 1) + 1)
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder, max_shard_size=max_shard)
        _ensure_classic_layout(folder, TINY_CONFIGS[name]["num_local_experts"])
        if config_style == "legacy":
            cfg_path = folder / "config.json"
            cfg = _legacy_config(json.loads(cfg_path.read_text()))
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copyfile(tokenizer_model_file(), folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        margins = m16 if dtype == "bfloat16" else m32
        self._meta[folder] = {
            "name": name,
            "dtype": dtype,
            "shards": shards,
            "config_style": config_style,
            "seed": seed,
            "config": dict(TINY_CONFIGS[name]),
            "probe_tokens": list(PROBE_TOKENS),
            **margins,
        }

    def meta(self, path: Path) -> dict:
        return self._meta[Path(path)]


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def _as_batch(tokens) -> list[list[int]]:
    if len(tokens) == 0:
        raise ValueError("empty token list")
    if isinstance(tokens[0], (list, tuple, np.ndarray)):
        batch = [[int(t) for t in row] for row in tokens]
    else:
        batch = [[int(t) for t in tokens]]
    if len({len(r) for r in batch}) != 1 or len(batch[0]) == 0:
        raise ValueError("rows must be non-empty and of equal length (no padding is done)")
    return batch


class HFReference:
    """transformers (float32, eager attention) as the numerical reference."""

    def __init__(self):
        self._models: dict[Path, Any] = {}

    def model(self, path: Path):
        import torch
        from transformers import MixtralForCausalLM

        path = Path(path)
        if path not in self._models:
            m = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
            self._models[path] = m.eval()
        return self._models[path]

    def logits(self, path: Path, tokens) -> np.ndarray:
        import torch

        batch = _as_batch(tokens)
        with torch.no_grad(), _torch_threads(1):
            out = self.model(path)(torch.tensor(batch, dtype=torch.long)).logits
        return out.float().numpy()

    def greedy(self, path: Path, prompt_tokens: list[int], n: int) -> list[int]:
        import torch

        model = self.model(path)
        seq = [int(t) for t in prompt_tokens]
        new: list[int] = []
        with torch.no_grad(), _torch_threads(1):
            for _ in range(n):
                logits = model(torch.tensor([seq], dtype=torch.long)).logits[0, -1]
                tok = int(torch.argmax(logits))
                seq.append(tok)
                new.append(tok)
        return new


class MlxLmConverter:
    """Callable ``(hf_path, quantize=False, bits=4, group_size=32, dtype="float32", recipe=None) -> Path``;
    ``recipe`` is one of mlx-lm's mixed-bit ``--quant-predicate`` recipes (e.g. ``mixed_3_6``)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[tuple, Path] = {}

    def __call__(
        self, hf_path: Path, quantize: bool = False, bits: int = 4, group_size: int = 32, dtype: str = "float32",
        recipe: str | None = None,
    ) -> Path:
        hf_path = Path(hf_path)
        key = (hf_path, bool(quantize), bits if quantize else None, group_size if quantize else None, dtype, recipe)
        if key in self._cache:
            return self._cache[key]
        tag = (f"q{bits}g{group_size}" + (f"-{recipe}" if recipe else "")) if quantize else "fp"
        out = self.root / f"{hf_path.name}-{tag}-{dtype}"
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf_path), "--mlx-path", str(out)]
        if dtype is not None:
            cmd += ["--dtype", dtype]
        if quantize:
            cmd += ["-q", "--q-bits", str(bits), "--q-group-size", str(group_size)]
            if recipe:
                cmd += ["--quant-predicate", recipe]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"mlx_lm convert failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if "rope_theta" not in cfg and isinstance(cfg.get("rope_parameters"), dict):
            theta = cfg["rope_parameters"].get("rope_theta")
            if theta is not None:
                cfg["rope_theta"] = theta
                cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
        self._cache[key] = out
        return out


class MlxLmReference:
    """mlx-lm (in-process) as the peer implementation."""

    def __init__(self):
        self._loaded: dict[Path, Any] = {}

    def load(self, mlx_path: Path):
        from mlx_lm import load

        mlx_path = Path(mlx_path)
        if mlx_path not in self._loaded:
            self._loaded[mlx_path] = load(str(mlx_path))
        return self._loaded[mlx_path]

    def logits(self, mlx_path: Path, tokens) -> np.ndarray:
        import mlx.core as mx

        model, _ = self.load(mlx_path)
        out = model(mx.array(_as_batch(tokens)))
        return np.array(out.astype(mx.float32))
