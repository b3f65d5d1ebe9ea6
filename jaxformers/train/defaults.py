"""The full set of training configuration keys with their defaults; config files start from here."""
from __future__ import annotations

import dataclasses
import difflib

import ml_collections
from ml_collections import config_dict

from jaxformers.config import RUNTIME_FIELDS, EncoderConfig
from jaxformers.data.sources import SOURCES
from jaxformers.errors import ConfigError
from jaxformers.layout import LayoutError
from jaxformers.mixers import all_options
from jaxformers.train.search import check_search
from jaxformers.train.sharding import LOGICAL_AXIS_RULES, rules_from
from jaxformers.train.tasks import TASKS

# A model trained from scratch is small unless the config says otherwise (EncoderConfig's own defaults are BERT-base).
SCRATCH_MODEL = dict(layout="serial*2", hidden_size=128, num_heads=4, intermediate_size=512,
                     max_position_embeddings=130)
# Filled from the tokenizer unless set.
FROM_TOKENIZER = ("vocab_size", "pad_token_id")


def model_defaults() -> ml_collections.ConfigDict:
  """``config.model``: exactly :class:`EncoderConfig`'s fields. ``None`` (unset) means: the tokenizer's value
  (``vocab_size``, ``pad_token_id``), else with ``init_from`` the checkpoint's, else EncoderConfig's default.
  With ``init_from`` the checkpoint fixes the parameters' shapes; ``layout`` ("" keeps the checkpoint's)
  re-arranges it and the runtime fields (dropout, dtype, attention/Fourier implementation, sparse window...)
  apply when set; any other field given on train.py's command line with another value than the checkpoint's is
  refused (the config file's values give way to the checkpoint's)."""
  m = ml_collections.ConfigDict()
  for f in dataclasses.fields(EncoderConfig):
    if f.name == "mixer_options":
      continue
    if f.name in FROM_TOKENIZER or f.name in RUNTIME_FIELDS:
      m[f.name] = config_dict.placeholder(type(f.default))
    else:
      m[f.name] = SCRATCH_MODEL.get(f.name, f.default)
  for name, default in all_options().items():   # registered token mixers' options; unset: the mixer's default
    m[name] = config_dict.placeholder(type(default))
  return m


def set_fields(model_cfg) -> dict:
  """The ``config.model`` fields that are set (not None), as plain values."""
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_cfg.to_dict().items() if v is not None}


def encoder_config(model_cfg, **fill) -> EncoderConfig:
  """One :class:`EncoderConfig` from ``config.model``; ``fill`` gives values for unset fields (the tokenizer's)."""
  fields = {**fill, **set_fields(model_cfg)}
  if not fields.get("layout"):
    raise ConfigError("config.model.layout is empty: a model trained from scratch needs a layout, e.g. 'serial*2' "
                      "(an empty layout keeps the layout of config.init_from)")
  try:
    return EncoderConfig.from_dict(fields, source="config.model")
  except LayoutError as e:
    raise ConfigError(f"config.model.layout: {e}".replace("\n", " ")) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).replace("EncoderConfig.", "config.model.")) from None


def base_config() -> ml_collections.ConfigDict:
  """Every training configuration key with its default, one section a helper (see each for its keys)."""
  c = ml_collections.ConfigDict()
  c.mode = "train"                 # train | eval | predict
  c.seed = 0
  c.task = "classification"        # a name in jaxformers.train.tasks.TASKS; supervised tasks follow the data's labels
  c.init_from = ""                 # a native jaxformers or HF PyTorch checkpoint directory to fine-tune from
  c.model = model_defaults()
  c.data = data_defaults()
  c.optim = optim_defaults()
  c.train = train_defaults()
  c.distill = distill_defaults()
  c.search = search_defaults()
  c.mesh = mesh_defaults()
  c.predict = ml_collections.ConfigDict()
  c.predict.output_dir = ""        # "": DIR/predictions
  return c


def data_defaults() -> ml_collections.ConfigDict:
  """``config.data``: where the examples come from, the tokenizer, lengths, batch sizes and packing."""
  d = ml_collections.ConfigDict()
  d.source = "embedded"            # embedded | glue_tsv | tfds | files
  d.glue_task = ""                 # cola sst2 mrpc qqp stsb mnli qnli rte wnli (glue_tsv and tfds)
  d.dir = ""                       # GLUE task directory (glue_tsv) or tfds data_dir (tfds)
  d.train_file = ""                # files: CSV / TSV / JSONL
  d.eval_file = ""
  d.test_file = ""
  d.text_a_column = "text"
  d.text_b_column = ""
  d.label_column = "label"
  d.label_names = ""               # files: comma-separated names, in label-id order
  d.num_labels = 0                 # files: number of classes (1 = regression); 0: inferred from train_file's labels
  d.tokenizer = ""                 # tokenizer.json or checkpoint dir; "" = from init_from, or train a WordPiece
  d.vocab_size = 8000              # size of a trained WordPiece vocabulary
  d.max_length = 128
  d.on_too_long = "truncate"       # truncate (one-line warning) | error
  d.batch_size = 32
  d.eval_batch_size = 64
  d.mlm_probability = 0.15
  # Packing (padding-free batches): several examples share a row of max_length tokens, told apart by segment ids,
  # for training, eval and predict of classification, regression and mlm. A train batch is pack_rows rows (0: as
  # many rows as batch_size examples of average length fill, so a step sees about batch_size examples; eval
  # batches likewise from eval_batch_size); per-example metrics and predictions equal the padded path's (MLM eval
  # draws its masks per packed batch, so its loss is comparable but not identical). Needs Fourier blocks with
  # fourier_impl matmul/auto and fourier_padding per_sequence. A checkpoint resumes only with the same setting.
  d.packing = False
  d.pack_max_segments = 16         # most examples one packed row holds (the classifier's slots per row)
  d.pack_rows = 0                  # rows per packed train batch; 0: ceil(batch_size * mean length / max_length)
  d.max_train_examples = 0         # > 0: keep a fixed random subset of N training examples (smoke runs, tests)
  return d


def optim_defaults() -> ml_collections.ConfigDict:
  """``config.optim``: AdamW, its learning-rate schedule, gradient accumulation and magnitude pruning."""
  o = ml_collections.ConfigDict()
  o.lr = 1e-3
  o.end_lr = 0.0
  o.schedule = "linear"            # linear | cosine | constant (after warmup)
  o.warmup_steps = -1              # -1: use warmup_ratio
  o.warmup_ratio = 0.06
  o.weight_decay = 0.01
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-6
  o.clip_norm = 1.0
  o.accum_steps = 1                # micro-batches per update (batch_size must divide by it)
  # Magnitude pruning kept through fine-tuning (jaxformers.prune.masked_updates): the sparsity fraction of the
  # smallest block dense-kernel weights, over all of them (global) or per kernel (layer), is zeroed at the start and
  # stays exactly zero. No speed-up on dense hardware.
  o.sparsity = 0.0
  o.sparsity_scope = "global"      # global | layer
  return o


def train_defaults() -> ml_collections.ConfigDict:
  """``config.train``: the run's length, logging, evaluation and checkpoints."""
  t = ml_collections.ConfigDict()
  t.num_steps = 1000               # the run's length: num_steps, or num_epochs when that is > 0 (then num_steps
  t.num_epochs = 0.0               # must be 0; on train.py's command line, setting one sets the other to 0)
  t.stop_after = 0                 # > 0: save and stop after this step (the schedule still spans num_steps)
  t.log_every = 50
  t.eval_every = 0                 # 0: only at the end
  t.checkpoint_every = 500
  t.keep = 2
  t.best_metric = ""               # "": the task's official metric on its first eval split
  t.best_mode = ""                 # max | min; "": min for losses, perplexity and mse, else max
  t.async_checkpoint = True
  t.progress = True
  return t


def distill_defaults() -> ml_collections.ConfigDict:
  """``config.distill``: distillation from a frozen teacher (jaxformers.distill): with distill.teacher set, the
  task's loss (weighted by distill.task) gets the losses below; task=heal trains on the data's texts with these
  losses alone."""
  k = ml_collections.ConfigDict()
  k.teacher = ""                   # any checkpoint from_pretrained takes (native, run, HF directory, Hub id)
  k.teacher_dtype = ""             # compute dtype of the teacher ("": its own; "bfloat16")
  k.task = 1.0                     # weight of the task's own loss
  k.logits = 0.0                   # soft-label KL (classification or masked-LM logits) at the temperature
  k.temperature = 2.0
  k.hidden = 0.0                   # hidden-state MSE over the layer map's pairs (mean over tokens)
  k.first_token = 0.0              # MSE of each sequence's final first-token state (what classifier heads read)
  k.attention = 0.0                # MiniLM self-attention relation KL (deepest pair where both have attention)
  k.value = 0.0                    # MiniLM value relation KL
  k.layer_map = ""                 # "student:teacher,..." over hidden-state indices (0 = embeddings); "": evenly spaced
  k.relation_heads = 0             # relation heads of the attention/value losses; 0: the student's heads
  return k


def search_defaults() -> ml_collections.ConfigDict:
  """``config.search``: architecture search (jaxformers.search, jaxformers.train.search): every sublayer position of
  config.model.layout (or of init_from's layout) chooses among search.candidates; weights learn on the training
  split, the architecture logits on a held-out part of it. configs/search.py is a complete example."""
  s = ml_collections.ConfigDict()
  s.enabled = False
  s.candidates = "attention,ffn,identity"   # comma-separated: attention ffn identity fourier sparse
  s.hard = False                   # straight-through one-hot samples instead of soft Gumbel-softmax weights
  s.heldout_fraction = 0.2         # share of the training examples kept for the architecture updates
  s.heldout_batch_size = 0         # 0: data.batch_size
  s.warmup_steps = 0               # steps with the architecture frozen (weights only)
  s.arch_every = 1                 # an architecture update every N steps after the warm-up
  s.arch_lr = 0.05                 # Adam learning rate of the architecture logits
  s.tau_start = 1.0                # Gumbel-softmax temperature, annealed exponentially after the warm-up
  s.tau_end = 0.1
  s.target_flops_ratio = 0.65      # expected FLOPs/token relative to the source layout's, in (0, 1]
  s.cost_weight = 2.0              # weight of max(0, E[FLOPs]/source FLOPs - target_flops_ratio)
  s.max_identity = 0.5             # most positions identity may take (read-off cap and penalty threshold)
  s.read_off = "target"            # "target": the most probable layout within target_flops_ratio; "argmax": each
                                   # position's most probable candidate, whatever it costs
  s.identity_weight = 2.0          # weight of max(0, mean P(identity) - max_identity)
  s.then_train = False             # then train the derived model (weights from the supernet) in DIR/derived_train
  s.then_train_steps = 0           # 0: train.num_steps
  return s


def mesh_defaults() -> ml_collections.ConfigDict:
  """``config.mesh``: the device mesh and the logical-axis sharding rules of the parameters."""
  m = ml_collections.ConfigDict()
  m.data = -1                      # devices on the pure data-parallel axis (-1: the rest)
  m.fsdp = 1                       # devices parameters are sharded over (FSDP); -1: all
  # logical parameter axis -> the mesh axis it is sharded over (data | fsdp; "": never sharded). Each parameter is
  # sharded along its first dimension whose axis maps to a mesh axis of size > 1 that divides it; the rest is
  # replicated. Parameters name these axes (jaxformers.train.sharding.LOGICAL_AXIS_RULES holds the defaults).
  m.rules = ml_collections.ConfigDict({name: axis or "" for name, axis in LOGICAL_AXIS_RULES})
  return m


def fill_from(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Set ``c``'s keys from a nested dict (a saved ``config.to_json()``); keys ``c`` lacks are skipped, ``None`` leaves
  a placeholder unset."""
  for k, v in values.items():
    if k not in c:
      continue
    if isinstance(v, dict):
      fill_from(c[k], v)
    elif v is not None:
      c[k] = tuple(v) if isinstance(v, list) else v
  return c


def check_keys(config, reference=None, prefix="") -> None:
  """Every key of ``config`` must exist in ``reference``; the error names the closest valid keys."""
  reference = base_config() if reference is None else reference
  for k in config.keys():
    if k not in reference:
      close = difflib.get_close_matches(k, list(reference.keys()), n=3)
      valid = ", ".join(f"{prefix}{c}" for c in close) if close else ", ".join(f"{prefix}{c}" for c in reference.keys())
      raise ConfigError(f"unknown config key '{prefix}{k}'; closest valid keys: {valid}")
    v = config[k]
    if isinstance(v, ml_collections.ConfigDict):
      check_keys(v, reference[k], prefix=f"{prefix}{k}.")


def check_values(c) -> None:
  """Every value the trainer would otherwise fail on late (or silently misuse), as one ConfigError line."""
  choices = {"mode": ("train", "eval", "predict"), "task": tuple(TASKS.names()), "data.source": tuple(SOURCES.names()),
             "data.on_too_long": ("truncate", "error"), "optim.schedule": ("linear", "cosine", "constant"),
             "train.best_mode": ("", "max", "min"), "optim.sparsity_scope": ("global", "layer")}
  for key, allowed in choices.items():
    v = _get(c, key)
    if v not in allowed:
      raise ConfigError(f"config.{key}={v!r}: expected one of {', '.join(allowed)}")
  at_least = {"data.batch_size": 1, "data.eval_batch_size": 1, "data.max_length": 2, "data.pack_max_segments": 1,
              "optim.accum_steps": 1, "train.checkpoint_every": 1, "train.log_every": 1, "train.keep": 1,
              "data.pack_rows": 0, "train.eval_every": 0, "data.max_train_examples": 0}
  for key, low in at_least.items():
    v = _get(c, key)
    if v < low:
      raise ConfigError(f"config.{key}={v}: must be at least {low}")
  if not c.optim.lr > 0:
    raise ConfigError(f"config.optim.lr={c.optim.lr}: must be a positive learning rate (a negative one would "
                      f"train by gradient ascent)")
  if not 0.0 <= c.optim.sparsity < 1.0:
    raise ConfigError(f"config.optim.sparsity={c.optim.sparsity}: the fraction of the blocks' weights to prune must be "
                      f"in [0, 1) (1 would prune every weight)")
  if c.optim.end_lr < 0:
    raise ConfigError(f"config.optim.end_lr={c.optim.end_lr}: must be at least 0")
  if c.train.num_epochs <= 0 and c.train.num_steps < 1:
    raise ConfigError(f"config.train.num_steps={c.train.num_steps}: the run has no steps; raise it or set "
                      f"train.num_epochs")
  if c.train.num_epochs > 0 and c.train.num_steps > 0:
    raise ConfigError(f"config.train.num_steps={c.train.num_steps} and config.train.num_epochs="
                      f"{c.train.num_epochs:g} are both set; one decides the run's length: set the other to 0")
  for key in ("task", "logits", "hidden", "first_token", "attention", "value"):
    if c.distill[key] < 0:
      raise ConfigError(f"config.distill.{key}={c.distill[key]}: a loss weight must be at least 0")
  if not c.distill.temperature > 0:
    raise ConfigError(f"config.distill.temperature={c.distill.temperature}: must be positive")
  if c.task == "heal" and not c.distill.teacher:
    raise ConfigError("config.task='heal' needs config.distill.teacher, the model to heal from")
  if c.search.enabled:
    check_search(c)
  try:
    rules_from(c.mesh.rules)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  if c.data.batch_size % c.optim.accum_steps:
    raise ConfigError(f"config.data.batch_size={c.data.batch_size} must be divisible by "
                      f"config.optim.accum_steps={c.optim.accum_steps}")


def _get(c, dotted: str):
  for part in dotted.split("."):
    c = c[part]
  return c


def parse_arg(arg: str | None, allowed: dict) -> dict:
  """``"task=rte,layout=parallel*12"`` -> dict, checked against ``allowed`` (name -> default)."""
  out = dict(allowed)
  if not arg:
    return out
  for item in _split_top(arg):
    k, eq, v = item.partition("=")
    k = k.strip()
    if not eq or k not in allowed:
      close = difflib.get_close_matches(k, list(allowed), n=3)
      raise ConfigError(f"config argument {item!r}: expected key=value with key one of {', '.join(allowed)}"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    out[k] = type(allowed[k])(v) if allowed[k] is not None and not isinstance(allowed[k], str) else v
  return out


def _split_top(s: str) -> list[str]:
  """Split ``key=value`` items on commas; a piece without ``=`` continues the previous value, so
  layouts with commas pass through: ``layout=fourier*10,serial*2,task=mlm``."""
  parts = []
  for piece in s.split(","):
    if "=" not in piece and parts:
      parts[-1] += "," + piece
    else:
      parts.append(piece)
  return parts
