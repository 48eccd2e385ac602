"""Text to ids and back, and the chat format a model was trained on.

`Tokenizer` (sentencepiece plus the folder's added tokens) is what `load` returns; its
`chat_format` (`chat_formats`) is Mistral's own encoding (`mistral_format`), the folder's Jinja
template (`chat_template`) or none; `tool_calls` reads Mistral's tool calls back from the output.
"""

from .chat_formats import BASE_MODEL_NOTE, ChatFormat, PlainFormat
from .detokenizer import StreamingDetokenizer
from .mistral_format import mistral_call_id
from .tokenizer import Tokenizer
from .tool_calls import ToolCall, parse_tool_calls, split_tool_calls

__all__ = ["BASE_MODEL_NOTE", "ChatFormat", "PlainFormat", "StreamingDetokenizer", "Tokenizer", "ToolCall", "mistral_call_id",
           "parse_tool_calls", "split_tool_calls"]
