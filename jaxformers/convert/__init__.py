"""Checkpoint conversion: HF PyTorch BERT / RoBERTa / PAF-RoBERTa / DistilBERT <-> jaxformers (families/: one module each)."""
from jaxformers.convert.engine import Report
from jaxformers.convert.hf import load_hf, load_hf_state, to_hf_state
from jaxformers.convert.native import rearrange

__all__ = ["Report", "load_hf", "load_hf_state", "rearrange", "to_hf_state"]
