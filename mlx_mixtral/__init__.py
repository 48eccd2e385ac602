"""mlx-mixtral: Mixtral 8x7B on Apple silicon with MLX.

The public API, which our own CLI, chat REPL and benchmark use too:

    model, tokenizer = mlx_mixtral.load("mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    for r in mlx_mixtral.stream_generate(model, tokenizer, ids, max_tokens=100):
        print(r.text, end="", flush=True)

    cache = mlx_mixtral.make_cache(model)
    logits = model(mx.array([ids]), cache=cache)   # [batch, length, vocab]

    cache = mlx_mixtral.make_cache(model, mlx_mixtral.kv_format(bits=8))  # quantized keys/values
    mlx_mixtral.generate(model, tokenizer, ids, cache=cache)

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    mlx_mixtral.generate(model, tokenizer, ids, grammar=mlx_mixtral.json_grammar(schema))  # enforced
"""

from .cache import make_cache
from .constrain import json_grammar
from .errors import MixtralError
from .generate import GenerationResponse, generate, stream_generate
from .kv_format import kv_format
from .loading import load
from .sampling import SamplingParams

__all__ = [
    "GenerationResponse",
    "MixtralError",
    "SamplingParams",
    "generate",
    "json_grammar",
    "kv_format",
    "load",
    "make_cache",
    "stream_generate",
]
