"""Masked-LM pre-training of any block layout from scratch (dynamic 15% masking, 80/10/10).

  python train.py --config configs/pretrain.py:layout=fourier*4,serial*2 --workdir /tmp/mlm
  python train.py --config configs/pretrain.py:size=base --config.data.source=files \
      --config.data.train_file=corpus.jsonl --config.data.eval_file=heldout.jsonl --workdir /tmp/mlm

Argument keys: layout, size (small: 256 wide, 4 layers; base: BERT-base). The default
data is the standard library's docstrings (offline); ``data.source=files`` reads the
``data.text_a_column`` of CSV/JSONL files. ``--config.data.packing=True`` packs the
documents into full 128-token rows (masking only real tokens, at least one per document).
"""
from jaxformers.train.defaults import base_config, parse_arg

SIZES = {"small": (256, 4, 1024, 4), "base": (768, 12, 3072, 12)}


def get_config(arg=None):
  a = parse_arg(arg, {"layout": "", "size": "small"})
  hidden, heads, inter, layers = SIZES[a["size"]]
  c = base_config()
  c.task = "mlm"
  c.model.layout = a["layout"] or f"serial*{layers}"
  c.model.hidden_size = hidden
  c.model.num_heads = heads
  c.model.intermediate_size = inter
  c.model.max_position_embeddings = 512
  c.data.source = "embedded"
  c.data.label_column = ""
  c.data.vocab_size = 8000
  c.data.max_length = 128
  c.data.batch_size = 64
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 500
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.98
  c.train.num_steps = 10000
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  c.lock()
  return c
