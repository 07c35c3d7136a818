"""lmforge: a from-scratch, hackable LLM stack in PyTorch."""

from lmforge.api import load, load_tokenizer, save
from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "__version__", "load", "load_tokenizer", "save"]
