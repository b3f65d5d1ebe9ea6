"""Fine-tune a pretrained encoder on your own CSV / TSV / JSONL files (text classification or regression).

  python train.py --config configs/finetune.py:train=train.csv,eval=dev.csv,text=sentence,label=label \
      --workdir runs/mine
  python train.py --config configs/finetune.py:train=train.csv,eval=dev.csv,test=test.csv,text=sentence \
      --config.mode=predict --workdir runs/mine          # DIR/predictions/test.tsv: index<TAB>label name

Argument keys: train, eval, test (files: .csv, .tsv or .jsonl), text, text_b (a second text column for pairs),
label (the label column), labels (class names in id order, e.g. labels=neg,pos; "": inferred from the training
file's label column, sorted, and logged; labels=regression for a numeric target), init_from (a jaxformers, run or
HF directory, or a Hub id; default sentence-transformers/all-MiniLM-L6-v2), layout ("" keeps the checkpoint's),
epochs, steps (> 0: a fixed number of steps instead of epochs), lr, batch, max_length.

The recipe is the usual one for pretrained encoders: AdamW at 3e-5, 10% linear warm-up then linear decay, weight
decay 0.01, 3 epochs, batch 32, an eval at the end (``--config.train.eval_every=N`` for more; the best checkpoint is
kept in DIR/best). ``--config.train.num_steps=N`` on the command line replaces the epochs (logged).
"""
from jaxformers.train.defaults import base_config, parse_arg

ARGS = {"train": "", "eval": "", "test": "", "text": "text", "text_b": "", "label": "label", "labels": "",
        "init_from": "sentence-transformers/all-MiniLM-L6-v2", "layout": "", "epochs": 3.0, "steps": 0,
        "lr": 3e-5, "batch": 32, "max_length": 128}


def get_config(arg=None):
  a = parse_arg(arg, ARGS)
  c = base_config()
  c.init_from = a["init_from"]
  c.model.layout = a["layout"]
  c.data.source = "files"
  c.data.train_file = a["train"]
  c.data.eval_file = a["eval"]
  c.data.test_file = a["test"]
  c.data.text_a_column = a["text"]
  c.data.text_b_column = a["text_b"]
  c.data.label_column = a["label"]
  if a["labels"] == "regression":
    c.task = "regression"
    c.data.num_labels = 1
  else:
    c.data.label_names = a["labels"]
    c.data.num_labels = 0            # the names' count, or inferred from the training file
  c.data.max_length = a["max_length"]
  c.data.batch_size = a["batch"]
  c.data.eval_batch_size = 2 * a["batch"]
  c.optim.lr = a["lr"]
  c.optim.warmup_ratio = 0.1
  c.optim.weight_decay = 0.01
  c.optim.eps = 1e-8
  c.train.num_steps = a["steps"]
  c.train.num_epochs = 0.0 if a["steps"] > 0 else a["epochs"]
  c.train.eval_every = 0             # 0: at the end
  c.train.checkpoint_every = 500
  c.train.log_every = 10
  c.lock()
  return c
