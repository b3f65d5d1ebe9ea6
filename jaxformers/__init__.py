"""jaxformers: efficient transformer encoders in JAX / Flax NNX."""
from jaxformers.config import EncoderConfig
from jaxformers.convert import CheckpointError, export_hf
from jaxformers.layout import parse_layout
from jaxformers.models import (Encoder, EncoderOutput, MaskedLM, PreTraining, SequenceClassifier, TokenClassifier,
                               build)
from jaxformers.pretrained import from_pretrained, save_pretrained
from jaxformers.runs import load_tokenizer

__version__ = "0.1.0"

__all__ = ["EncoderConfig", "CheckpointError", "export_hf", "parse_layout", "Encoder", "EncoderOutput", "MaskedLM",
           "PreTraining", "SequenceClassifier", "TokenClassifier", "build", "from_pretrained", "save_pretrained",
           "load_tokenizer"]
