"""The interface every lmforge tokenizer implements: `BaseTokenizer`, and `IncrementalDecoder` built on it.

Generation, chat templates, the trainer and GGUF export take "a tokenizer" without caring whether it is the
byte-level BPE `Tokenizer` (``bpe.py``: GPT-2, GPT-4, Llama 3) or the `SentencePieceTokenizer` (``spm.py``: the
"llama" vocabularies of GGUF files). This module says what that means, so each caller is typed against one class
and a new kind of tokenizer knows what it must provide:

* **ids and text**: ``encode`` (tiktoken's rules for special tokens in the text), ``encode_ordinary`` (specials as
  plain text), ``decode_bytes`` (the tokens' bytes joined), ``decode`` (those bytes as UTF-8, invalid bytes
  replaced: a tokenizer may override it, as SentencePiece drops the space it adds in front);
* **the vocabulary**: ``vocab_size`` (1 + the largest id), ``token_to_bytes`` (what one id stands for: what a
  streaming decoder joins), ``token_to_id`` / ``id_to_token`` / ``get_vocab`` (lookups in the tokenizer's own
  token spelling), ``special_tokens`` (text -> id of the tokens matched before encoding);
* **metadata** a model's files carry: ``bos_token``, ``eos_token``, ``eot_token`` (generation stops at eos and
  eot), ``pad_token``, ``unk_token``, ``add_bos_token`` (a prompt starts with bos), ``chat_template``,
  ``model_max_length`` and ``source`` (the file it was loaded from, named in errors); None (False) when unknown.

What follows from those is written once here: tiktoken's allowed/disallowed special-token rules (``_specials``,
``_check``), ``encode_batch`` (in worker processes for large batches), ``decode`` and ``apply_chat_template``.
Saving is not part of the interface: only the byte-level tokenizer has files to write (``Tokenizer.save``).
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal

import lmforge.tokenizer.pretokenize as pt
from lmforge.utils.pool import cpu_count, map_in_pool

__all__ = ["BaseTokenizer", "IncrementalDecoder"]


class BaseTokenizer(ABC):
    """A tokenizer as generation, chat, training and export use it (see the module docstring).

    Subclasses implement the abstract methods and set ``special_tokens``; the metadata attributes default to
    None (unknown) and are set by the loaders.
    """

    special_tokens: dict[str, int]  # text -> id of the tokens cut out of the text before encoding
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eot_token: str | None = None  # end of turn (GGUF tokenizer.ggml.eot_token_id): generation stops there too
    pad_token: str | None = None
    unk_token: str | None = None
    model_max_length: int | None = None
    add_bos_token: bool = False  # encode_prompt puts bos_token first
    source: str | None = None  # the file or directory it was loaded from, named in encode errors

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of ids: 1 + the largest id, ordinary or special."""

    @abstractmethod
    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Text -> ids, with tiktoken's rules: specials in ``allowed_special`` become their ids, those in
        ``disallowed_special`` (default: every other special) raise ValueError, the rest are plain text."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, special tokens treated as plain text."""

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of the tokens, joined."""

    @abstractmethod
    def token_to_bytes(self, id: int) -> bytes:
        """What one id stands for, as bytes (a special token: its text in UTF-8)."""

    @abstractmethod
    def token_to_id(self, token: bytes | str) -> int | None:
        """The id of a token in this tokenizer's spelling, or None."""

    @abstractmethod
    def id_to_token(self, id: int) -> bytes | str:
        """The token of an id, in this tokenizer's spelling."""

    @abstractmethod
    def get_vocab(self) -> dict[Any, int]:
        """Token -> id, every token in this tokenizer's spelling."""

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD (with ``errors="replace"``)."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def _specials(self, allowed_special, disallowed_special) -> tuple[frozenset[str], frozenset[str]]:
        """tiktoken's arguments -> (allowed specials, strings that must not occur in the text)."""
        specials = self.special_tokens.keys()
        allowed = specials if allowed_special == "all" else specials & allowed_special
        disallowed = specials - allowed if disallowed_special == "all" else disallowed_special
        return frozenset(allowed), frozenset(disallowed)

    @staticmethod
    def _check(text: str, disallowed: frozenset[str]) -> None:
        """Raise ValueError (tiktoken's message) when `text` holds a disallowed special token."""
        if disallowed and (m := pt.special_regex(disallowed).search(text)):
            raise ValueError(
                f"Encountered text corresponding to disallowed special token {m.group()!r}. Pass it in "
                "allowed_special (or allowed_special='all') to encode it as a special token, or "
                "disallowed_special=() to encode it as ordinary text."
            )

    def encode_batch(
        self, texts: Sequence[str], *, workers: int | None = None, num_threads: int | None = None, **kw: Any
    ) -> list[list[int]]:
        """``[encode(t, **kw) for t in texts]``; ``workers`` processes (default: all cores when over 1 MB)."""
        workers = workers or num_threads
        if workers is None:
            workers = cpu_count() if len(texts) > 1 and sum(map(len, texts)) > 1 << 20 else 1
        if workers <= 1 or len(texts) <= 1:
            return [self.encode(t, **kw) for t in texts]
        return map_in_pool(_encode_one, texts, workers, self, kw)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_assistant_mask: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render a conversation with ``self.chat_template`` (see ``lmforge.tokenizer.chat``)."""
        from lmforge.tokenizer.chat import apply_chat_template  # lazy: jinja2 loads only for chat

        return apply_chat_template(self, messages, add_generation_prompt, tokenize, return_assistant_mask, **kwargs)


def _encode_one(text: str, tokenizer: BaseTokenizer, kw: dict) -> list[int]:
    """One text of `BaseTokenizer.encode_batch`, in a worker process."""
    return tokenizer.encode(text, **kw)


class IncrementalDecoder:
    """Decode ids one at a time for streaming generation; never splits a UTF-8 character.

    The concatenation of everything ``add`` and ``flush`` return equals ``tokenizer.decode_bytes(ids)`` decoded
    (``tokenizer.decode(ids)`` for a byte-level tokenizer).
    """

    def __init__(self, tokenizer: BaseTokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, id: int) -> str:
        """The text completed by this token (incomplete trailing bytes are kept for the next call)."""
        return self._utf8.decode(self.tokenizer.token_to_bytes(id))

    def flush(self) -> str:
        """Whatever bytes are left, invalid ones replaced; the decoder is then ready for a new stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
