"""NNX leaf modules: embeddings, attention, Fourier mixing, feed-forward."""
from jaxformers.layers.attention import SelfAttention
from jaxformers.layers.common import Sequences, positions_in_segment
from jaxformers.layers.embeddings import Embeddings, position_ids
from jaxformers.layers.fourier import FourierMixing
from jaxformers.layers.mlp import FeedForward

__all__ = ["SelfAttention", "Sequences", "positions_in_segment", "Embeddings", "position_ids",
           "FourierMixing", "FeedForward"]
