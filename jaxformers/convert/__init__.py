"""Checkpoint conversion: HF PyTorch BERT / RoBERTa / PAF-RoBERTa / DistilBERT <-> jaxformers (families/: one module each)."""
from jaxformers.convert.engine import Report
from jaxformers.convert.hf import export_hf, load_hf, load_hf_state, to_hf_state
from jaxformers.convert.io import CheckpointError
from jaxformers.convert.native import rearrange

__all__ = ["CheckpointError", "Report", "export_hf", "load_hf", "load_hf_state", "rearrange", "to_hf_state"]
