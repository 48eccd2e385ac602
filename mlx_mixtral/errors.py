"""The one exception type users see.

Anything the user can fix (a bad path, a broken shard, a prompt that does not fit) is raised as
`MixtralError` with a single line that names the file or value and says what to do. The CLI, the
REPL and the converter print that line and exit non-zero instead of showing a traceback.
"""


class MixtralError(Exception):
    """A user-facing error whose message is one line: what is wrong, where, and what to do."""
