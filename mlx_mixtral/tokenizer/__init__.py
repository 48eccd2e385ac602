"""Text to ids and back, and the chat format a model was trained on.

`Tokenizer` (sentencepiece plus the folder's added tokens) is what `load` returns; its
`chat_format` (`chat_formats`) is Mistral's own encoding (`mistral_format`), the folder's Jinja
template (`chat_template`) or none; `tool_calls` says how a model
is told about tools and writes its calls, and reads them back.
"""

from .chat_formats import BASE_MODEL_NOTE, ChatFormat, PlainFormat
from .detokenizer import StreamingDetokenizer
from .mistral_format import mistral_call_id, new_call_id
from .tokenizer import Tokenizer
from .tool_calls import GENERIC, ToolCall, ToolCallReader, ToolSyntax, generic_messages, scan_calls, tool_syntax

__all__ = ["BASE_MODEL_NOTE", "GENERIC", "ChatFormat", "PlainFormat", "StreamingDetokenizer", "Tokenizer", "ToolCall",
           "ToolCallReader", "ToolSyntax", "generic_messages", "mistral_call_id", "new_call_id", "scan_calls", "tool_syntax"]
