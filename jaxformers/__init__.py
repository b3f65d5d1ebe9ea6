"""jaxformers: efficient transformer encoders in JAX / Flax NNX.

Shape letters. An array's name ends with one capital letter per axis (``x_BLD`` is
``[batch, length, hidden]``), with the same meaning in every module, layers and kernels alike:

====  ==========================================================================
B     batch (rows)
L     length: token positions of a row
S     selected positions of a row (one per sequence: first tokens, packed segments)
Q, K  query and key positions (a kernel's block of them, or all of L)
D     hidden size (model width)
F     feed-forward width (intermediate size)
N     attention heads
H     head dimension (D = N x H)
M     padded transform length of the chirp-z (Bluestein) Fourier path
V     vocabulary
====  ==========================================================================
"""
from jaxformers.checkpoints.pretrained import export_hf, from_pretrained, save_pretrained
from jaxformers.checkpoints.tokenizers import load_tokenizer
from jaxformers.config import EncoderConfig
from jaxformers.encode import encode
from jaxformers.errors import CheckpointError
from jaxformers.layout import parse_layout
from jaxformers.models import Encoder, EncoderOutput, MaskedLM, PreTraining, SequenceClassifier, TokenClassifier, build
from jaxformers.quant import quantize

__version__ = "0.1.0"
# This project's distribution is "jaxformers-encoders" (the index's "jaxformers" is an unrelated package); the
# notebooks' install cell reads this line to tell the two apart without importing either.
__project__ = "jaxformers-encoders"

__all__ = ["encode", "EncoderConfig", "CheckpointError", "export_hf", "parse_layout", "Encoder", "EncoderOutput", "MaskedLM",
           "PreTraining", "SequenceClassifier", "TokenClassifier", "build", "from_pretrained", "save_pretrained",
           "load_tokenizer", "quantize"]
