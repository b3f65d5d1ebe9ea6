"""A tiny, fast configuration for tests and smoke runs (the embedded docstring data, a 2-layer 32-wide model).

  python train.py --config configs/tiny.py:layout=parallel*2 --workdir /tmp/tiny

Argument keys: layout (any block layout), task (classification | mlm), steps.
"""
from jaxformers.train.defaults import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, {"layout": "serial*2", "task": "classification", "steps": 8})
  c = base_config()
  c.task = a["task"]
  c.model.layout = a["layout"]
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.model.intermediate_size = 64
  c.model.max_position_embeddings = 64
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.vocab_size = 400
  c.data.max_length = 32
  c.data.max_train_examples = 64
  c.data.batch_size = 16
  c.data.eval_batch_size = 64
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.num_steps = a["steps"]
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.train.progress = False
  c.train.async_checkpoint = False
  c.lock()
  return c
