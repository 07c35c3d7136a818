"""Tokenizers: the interface every tokenizer implements (``base.py``), byte-level BPE training, encoding and decoding
(``bpe.py`` and ``pretokenize.py``), SentencePiece vocabularies of GGUF files (``spm.py``), file formats
(``formats.py`` reads, ``writers.py`` writes) and chat templates (``chat.py``)."""

from lmforge.tokenizer.base import BaseTokenizer, IncrementalDecoder
from lmforge.tokenizer.bpe import Tokenizer, train_bpe
from lmforge.tokenizer.formats import TokenizerFileError, load_tokenizer, save_tokenizer
from lmforge.tokenizer.pretokenize import CL100K_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, SplitRule

__all__ = [
    "CL100K_PATTERN",
    "GPT2_PATTERN",
    "LLAMA3_PATTERN",
    "BaseTokenizer",
    "IncrementalDecoder",
    "SplitRule",
    "Tokenizer",
    "TokenizerFileError",
    "load_tokenizer",
    "save_tokenizer",
    "train_bpe",
]
