"""Byte-level BPE tokenizers: training, encoding, decoding (see ``bpe.py`` and ``pretokenize.py``),
file formats (``formats.py``) and chat templates (``chat.py``)."""

from lmforge.tokenizer.bpe import IncrementalDecoder, Tokenizer, train_bpe
from lmforge.tokenizer.formats import TokenizerFileError, load_tokenizer, save_tokenizer
from lmforge.tokenizer.pretokenize import CL100K_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, SplitRule

__all__ = [
    "CL100K_PATTERN",
    "GPT2_PATTERN",
    "LLAMA3_PATTERN",
    "IncrementalDecoder",
    "SplitRule",
    "Tokenizer",
    "TokenizerFileError",
    "load_tokenizer",
    "save_tokenizer",
    "train_bpe",
]
