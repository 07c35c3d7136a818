"""The error lmforge raises for anything a user handed it: a file, a field in a file, a flag, a value.

Every such error derives from `LmforgeError` (a `ValueError`), and its message names what was wrong in the user's
own terms: the file, that file's own key (``num_hidden_layers``, ``llama.attention.head_count_kv``), the CLI flag.
The CLI prints it as one ``error:`` line. Apart from it, only `OSError` (a missing or unreadable file) leaves
lmforge's loaders; anything else escaping from a file lmforge reads is a bug.
"""

from __future__ import annotations


class LmforgeError(ValueError):
    """A user's input (file, field, flag or value) is wrong; the message names it."""
