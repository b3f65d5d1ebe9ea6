"""Fine-tune a converted BERT / RoBERTa (in any block layout) on a GLUE task.

  python train.py --config configs/glue.py:task=rte,layout=parallel*12 \
      --config.init_from=/path/to/bert-base-uncased --config.data.dir=/path/to/glue/RTE --workdir /tmp/rte

Argument keys: task (cola sst2 mrpc qqp stsb mnli qnli rte wnli), layout ("" keeps the
checkpoint's), source (glue_tsv: the GLUE TSV files in data.dir | tfds: glue/<task>).
Hyper-parameters follow the usual BERT recipe: AdamW 2e-5, batch 32, 3 epochs, 6%
warmup then linear decay (RTE, MRPC, STS-B, CoLA: 5 epochs). Predict:
``--config.mode=predict`` writes GLUE submission TSVs to DIR/predictions.
``--config.data.packing=True`` trains, evaluates and predicts on packed rows (several
examples a row, same per-example predictions; see data.packing in defaults.py).
"""
from jaxformers.data.glue import get_task
from jaxformers.train.defaults import base_config, parse_arg

SMALL = ("rte", "mrpc", "stsb", "cola", "wnli")


def get_config(arg=None):
  a = parse_arg(arg, {"task": "rte", "layout": "", "source": "glue_tsv"})
  task = get_task(a["task"])
  c = base_config()
  c.task = "regression" if task.is_regression else "classification"
  c.model.layout = a["layout"]
  c.model.max_position_embeddings = 512
  c.data.source = a["source"]
  c.data.glue_task = task.name
  c.data.max_length = 128
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.optim.lr = 2e-5
  c.optim.warmup_ratio = 0.06
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.train.num_epochs = 5.0 if task.name in SMALL else 3.0
  c.train.num_steps = 0
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  c.lock()
  return c
