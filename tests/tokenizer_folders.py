"""Tokenizer folders of the Mixtral family, built from the real tokenizer files mistral-common ships.

Each builder writes what the hub repository (or a conversion of it) holds beside the weights:
* `instruct_v1`: Mixtral-8x7B-Instruct-v0.1 (tokenizer.model v1, its [INST] template);
* `instruct_v3`: Mixtral-8x22B-Instruct-v0.1 (the v3 tokenizer.model, 32768 ids, control pieces,
  a template that speaks [INST] and [AVAILABLE_TOOLS]);
* `chatml`: a ChatML fine-tune (Nous-Hermes-2-Mixtral, dolphin-mixtral style): v1 plus
  `<|im_end|>` = 32000 and `<|im_start|>` = 32001, eos `<|im_end|>`, the template in
  tokenizer_config.json; in the layouts users meet: "model" (tokenizer.model + added_tokens.json),
  "json" (tokenizer.json only, as transformers 5 saves it, template in chat_template.jinja),
  "both";
* `base`: a base model (v1 or v3 tokenizer, no template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common
import numpy as np
from safetensors.numpy import load_file, save_file

DATA = Path(mistral_common.__file__).parent / "data"
V1_MODEL = DATA / "tokenizer.model.v1"
V3_MODEL = DATA / "mistral_instruct_tokenizer_240323.model.v3"

INSTRUCT_V1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Shaped like the hub's 8x22B-Instruct template (abridged): [INST] markup and a tools block.
INSTRUCT_V3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if tools is not none and loop.last %}[AVAILABLE_TOOLS] {{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST] {{ message['content'] }}[/INST]{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A ChatML template with tools (Hermes-2-Pro style, abridged), as a named "tool_use" template.
CHATML_TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools: <tools>{{ tools|tojson }}</tools><|im_end|>\n"
    "{% endif %}" + CHATML_TEMPLATE
)

# Hermes-2-Pro's tool-use template (abridged): tools in <tools>, each call in <tool_call> tags,
# results as <tool_response> in a "tool" turn; <tool_call> and </tool_call> are added tokens.
HERMES_TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou are a function calling AI model. You are provided with function "
    "signatures within <tools></tools> XML tags: <tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> "
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags.<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- for tool_call in message.tool_calls %}{{ '\n' if not loop.first else '' }}{{ '<tool_call>\n' }}"
    '{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}'
    "{{ '\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}{{ '<|im_start|>tool\n<tool_response>\n' + message.content + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _entry(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _config(eos: str = "</s>", template=None, extra_decoder: dict | None = None, legacy: bool = True) -> dict:
    decoder = {str(i): _entry(c, True) for i, c in enumerate(["<unk>", "<s>", "</s>"])}
    decoder.update(extra_decoder or {})
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
              "eos_token": eos, "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "legacy": legacy,
              "model_max_length": 32768, "tokenizer_class": "LlamaTokenizer"}
    if template is not None:
        config["chat_template"] = template
    return config


def _write(folder: Path, config: dict, model: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():  # transformers picks the tokenizer class by model type
        (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    shutil.copyfile(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def instruct_v1(folder: Path) -> Path:
    return _write(folder, _config(template=INSTRUCT_V1_TEMPLATE), V1_MODEL)


def instruct_v3(folder: Path) -> Path:
    return _write(folder, _config(template=INSTRUCT_V3_TEMPLATE), V3_MODEL)


def base(folder: Path, version: int = 1) -> Path:
    return _write(folder, _config(), V1_MODEL if version == 1 else V3_MODEL)


def chatml(folder: Path, layout: str = "model", legacy: bool = True, tools: bool = False) -> Path:
    """A ChatML fine-tune's tokenizer files in `layout` ("model", "json" or "both")."""
    template = ([{"name": "default", "template": CHATML_TEMPLATE}, {"name": "tool_use", "template": CHATML_TOOL_TEMPLATE}]
                if tools else CHATML_TEMPLATE)
    return _chatml(folder, layout, legacy, template)


def hermes(folder: Path) -> Path:
    """A Hermes-2-Pro-style fine-tune: ChatML plus a template with tools and <tool_call> tags."""
    return _chatml(folder, "model", True, HERMES_TOOL_TEMPLATE,
                   {"32002": _entry("<tool_call>", False), "32003": _entry("</tool_call>", False)})


def _chatml(folder: Path, layout: str, legacy: bool, template, more: dict | None = None) -> Path:
    added = {"32000": _entry("<|im_end|>", True), "32001": _entry("<|im_start|>", False), **(more or {})}
    source = folder.with_name(folder.name + "-source") if layout != "model" else folder
    _write(source, _config("<|im_end|>", template, added, legacy), V1_MODEL)
    (source / "added_tokens.json").write_text(json.dumps({entry["content"]: int(i) for i, entry in added.items()}))
    (source / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}))
    (source / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 32000}))
    if layout == "model":
        return folder
    from transformers import AutoTokenizer

    saved = folder.with_name(folder.name + "-saved")
    AutoTokenizer.from_pretrained(source).save_pretrained(saved)
    folder.mkdir(parents=True, exist_ok=True)
    for path in saved.iterdir():
        if path.name != "tokenizer.model" and not (folder / path.name).exists():
            shutil.copyfile(path, folder / path.name)
    shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    if not (folder / "config.json").exists():
        shutil.copyfile(source / "config.json", folder / "config.json")
    if layout == "both":
        shutil.copyfile(V1_MODEL, folder / "tokenizer.model")
    assert (folder / "tokenizer.model").exists() == (layout == "both")
    return folder


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def with_weights(source: Path, folder: Path, builder, *args) -> Path:
    """`folder`: the weights of the checkpoint `source` with a family member's tokenizer files
    (`builder(folder, *args)`), its vocabulary grown to cover them (plus a few ids no tokenizer knows)."""
    from mlx_mixtral.tokenizer import Tokenizer

    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.name not in TOKENIZER_FILES:
            shutil.copyfile(path, folder / path.name)
    builder(folder, *args)
    _grow_vocabulary(folder, Tokenizer.from_folder(folder).vocab_size + 6)
    return folder


def _grow_vocabulary(folder: Path, rows: int) -> None:
    """Give the checkpoint `rows` embedding and lm_head rows (a fine-tune's added tokens, plus a
    few ids its tokenizer does not know, as some published checkpoints pad their vocabulary)."""
    config = json.loads((folder / "config.json").read_text())
    if config["vocab_size"] >= rows:
        return
    rng = np.random.default_rng(0)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                old = tensors[name]
                extra = rng.normal(0, float(old.std()), (rows - old.shape[0], old.shape[1])).astype(old.dtype)
                tensors[name] = np.concatenate([old, extra])
        save_file(tensors, shard, metadata={"format": "pt"})
    config["vocab_size"] = rows
    generation = folder / "generation_config.json"
    if generation.exists():  # a fine-tune's config.json names its own end of turn too
        config["eos_token_id"] = json.loads(generation.read_text())["eos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
