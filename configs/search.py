"""Architecture search (PAR supernet, compute-aware) on the embedded default data, offline, about 9 minutes on CPU.

  python train.py --config configs/search.py --workdir runs/search

Every sublayer position of a 4-layer serial encoder (8 positions) chooses among attention, feed-forward and
identity; weights learn on 80% of the training examples, the architecture logits on the other 20%, with the
expected FLOPs per token driven to 65% of the serial model's. The run writes the found layout and the derived
model (DIR/derived, weights from the supernet), DIR/search_heatmap.png and summary.json["search"], and prints the
train.py command that trains the derived model (``then_train=1`` runs it). Measured on 2 shared CPU cores: 300 steps
in 8.4 minutes (9 with start-up), found ``attention,ffn,attention*2`` (46% of the serial model's FLOPs/token).

Argument keys: layout (the source layout), candidates (e.g. attention+ffn+identity+fourier, '+'-separated),
target (search.target_flops_ratio), steps, warmup, then_train (0/1), seed.
"""
from jaxformers.train.defaults import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, {"layout": "serial*4", "candidates": "attention+ffn+identity", "target": 0.65, "steps": 300,
                      "warmup": 60, "then_train": 0, "seed": 0})
  c = base_config()
  c.seed = a["seed"]
  c.model.layout = a["layout"]
  c.model.hidden_size = 128
  c.model.num_heads = 4
  c.model.intermediate_size = 512
  c.model.max_position_embeddings = 130
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.source = "embedded"
  c.data.vocab_size = 6000
  c.data.max_length = 128
  c.data.batch_size = 32
  c.optim.lr = 1e-3
  c.optim.warmup_ratio = 0.1
  c.train.num_steps = a["steps"]
  c.train.eval_every = 0
  c.train.checkpoint_every = 100
  c.train.log_every = 10
  s = c.search
  s.enabled = True
  s.candidates = a["candidates"].replace("+", ",")
  s.target_flops_ratio = a["target"]
  s.warmup_steps = a["warmup"]
  s.heldout_batch_size = 16
  s.arch_every = 2                 # an architecture update every second step: search wall time ~1.5-2x training's
  s.arch_lr = 0.15
  s.then_train = bool(a["then_train"])
  c.lock()
  return c
