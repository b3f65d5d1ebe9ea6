"""Mutation check: plant named bugs in a copy of the package and confirm the tests named after them fail.

  python tests/mutation_check.py            # every mutant (several minutes on 2 cores)
  python tests/mutation_check.py -k gelu    # mutants whose name contains "gelu"
  python tests/mutation_check.py --list     # check every substitution still applies, run nothing

Each mutant is one exact text substitution in one file; it must match exactly once, so a mutant whose source
has changed fails loudly instead of silently testing nothing. For each, the package (jaxformers/, configs/,
tests/, train.py, pyproject.toml) is copied to a temporary directory, the substitution applied, and the catching
tests run there with ``pytest -x -q -k ...`` and PYTHONPATH at the copy. Prints a table (mutant -> the
test that failed, or SURVIVED) and exits 1 if any mutant survived or could not be applied. Not collected by pytest (no
``test_`` prefix); run it by hand or in CI after the suite.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("jaxformers", "configs", "tests", "train.py", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  file: str
  old: str
  new: str
  test: str          # pytest target: file, with ``-k`` expression after "::"


MUTANTS = [
    Mutant("ortho Fourier scaling forgets the hidden size", "jaxformers/layers/fourier.py",
           "jax.lax.rsqrt(n_BL * x_BLD.shape[-1])", "jax.lax.rsqrt(n_BL)",
           "tests/test_blocks.py::fourier_ortho"),
    Mutant("ortho Fourier scaling uses the padded length", "jaxformers/layers/fourier.py",
           "n_BL = jnp.maximum(seq.lengths(), 1).astype(jnp.float32)",
           "n_BL = jnp.full(x_BLD.shape[:2], x_BLD.shape[1], jnp.float32)",
           "tests/test_blocks.py::fourier_ortho"),
    Mutant("converter swaps key/value weights", "jaxformers/convert/families/bert.py",
           'for n in ("query", "key", "value") for r in linear(f"{_L}.attention.self.{n}", f"{_B}.mixer.{n}"',
           'for n, m in (("query", "query"), ("key", "value"), ("value", "key")) '
           'for r in linear(f"{_L}.attention.self.{n}", f"{_B}.mixer.{m}"',
           "tests/test_convert.py::rearranged"),
    Mutant("wrong LayerNorm epsilon mapping", "jaxformers/convert/families/bert.py",
           'layer_norm_eps=hf.get("layer_norm_eps", 1e-12)', "layer_norm_eps=1e-12",
           "tests/test_convert.py::non_default_config"),
    Mutant("activation mapping ignores hidden_act", "jaxformers/convert/families/bert.py",
           'hidden_act=activation(hf, "hidden_act", where)', 'hidden_act="gelu"',
           "tests/test_convert.py::non_default_config"),
    Mutant("re-arrangement sends the k-th attention to the wrong block", "jaxformers/convert/engine.py",
           "out[(i, group)] = slots[k] if k < len(slots) else None",
           "out[(i, group)] = slots[len(slots) - 1 - k] if k < len(slots) else None",
           "tests/test_convert.py::rearranged"),
    Mutant("RoBERTa position offset wrong", "jaxformers/config.py",
           'return self.pad_token_id + 1 if self.position_style == "roberta" else 0',
           'return self.pad_token_id if self.position_style == "roberta" else 0',
           "tests/test_convert.py::random_checkpoints and RobertaModel"),
    Mutant("fine-tuning ignores init_from", "jaxformers/train/loop.py",
           "    if self.pretrained is not None:\n      _, p, r = nnx.split(self.pretrained",
           "    if False:\n      _, p, r = nnx.split(self.pretrained",
           "tests/test_train_pretrained.py::native"),
    Mutant("warm-up dropped", "jaxformers/train/optim.py",
           "  if warmup == 0:\n    return decay", "  if True:\n    return decay",
           "tests/test_train_units.py::schedule"),
    Mutant("gradient clipping skipped", "jaxformers/train/optim.py",
           "  if cfg.clip_norm and cfg.clip_norm > 0:", "  if False:",
           "tests/test_train_units.py::adamw"),
    Mutant("weight decay on LayerNorm and biases", "jaxformers/train/optim.py",
           "lambda p: p.ndim > 1", "lambda p: p.ndim > 0",
           "tests/test_train_units.py::decay_mask"),
    Mutant("accumulation divides by the micro-batch count again", "jaxformers/train/steps.py",
           "g = jax.tree.map(lambda x: x / denom, g)", "g = jax.tree.map(lambda x: x / denom / accum_steps, g)",
           "tests/test_train_units.py::accumulation"),
    Mutant("resume skips the data position", "jaxformers/train/loop.py",
           '      batches.restore(saved["data_state"])', "      pass",
           "tests/test_train_resume.py::test_resume_is_bit_identical"),
    Mutant("best checkpoint picks min instead of max", "jaxformers/train/task_base.py",
           'return f"{self.eval_splits[0]}/{self.metric}", "max"',
           'return f"{self.eval_splits[0]}/{self.metric}", "min"',
           "tests/test_train_units.py::trainer_keeps"),
    Mutant("NaN message names the previous step", "jaxformers/train/loop.py",
           'raise NonFiniteLoss(f"training loss became {loss} at step {at};',
           'raise NonFiniteLoss(f"training loss became {loss} at step {at - 1};',
           "tests/test_train_errors.py::nan"),
    Mutant("MLM 80/10/10 changed to 70/20/10", "jaxformers/data/batching.py",
           "new[chosen & (u < 0.8)] = mask_id", "new[chosen & (u < 0.7)] = mask_id",
           "tests/test_train_units.py::mlm_masking"),
    Mutant("MLM masks special tokens", "jaxformers/data/batching.py",
           "candidate = real & ~np.isin(ids, np.asarray(special_ids, np.int32))", "candidate = real",
           "tests/test_train_units.py::mlm_masking"),
    Mutant("F1 computed with macro average", "jaxformers/train/metrics.py",
           "skm.f1_score(labels, preds, zero_division=0)",
           'skm.f1_score(labels, preds, average="macro", zero_division=0)',
           "tests/test_train_units.py::f1"),
    Mutant("GELU replaced by the tanh approximation", "jaxformers/layers/mlp.py",
           "return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))",
           "return jax.nn.gelu(x, approximate=True)",
           "tests/test_blocks.py::gelu"),
    Mutant("packing segment ids off by one (pack)", "jaxformers/packing.py",
           "      seg[r, col:col + n] = s + 1\n      if types", "      seg[r, col:col + n] = s\n      if types",
           "tests/test_packing.py::segment_ids"),
    Mutant("packing segment ids off by one (train batches)", "jaxformers/data/batching.py",
           "      seg[r, col:col + n] = s + 1\n      slots[r, s] = i",
           "      seg[r, col:col + n + 1] = s + 1\n      slots[r, s] = i",
           "tests/test_packing.py::segment_ids"),
    Mutant("first-fit takes the last row that fits", "jaxformers/packing.py",
           "    for r, free in enumerate(space):", "    for r, free in reversed(list(enumerate(space))):",
           "tests/test_packing.py::first_fit"),
    Mutant("sparse window one block too wide", "jaxformers/layers/sparse.py",
           "& (jnp.abs(idx_q[..., :, None] - idx_k[..., None, :]) <= window // 2)",
           "& (jnp.abs(idx_q[..., :, None] - idx_k[..., None, :]) <= window // 2 + blk)",
           "tests/test_blocks.py::window"),
    Mutant("wrong softmax scale in the Pallas kernel", "jaxformers/kernels/attention/flash.py",
           "  scale = H**-0.5 if scale is None else float(scale)", "  scale = H**-0.5",
           "tests/test_attention_kernels.py::explicit_scale"),
    Mutant("wrong softmax scale in the XLA reference", "jaxformers/kernels/attention/reference.py",
           "  scale = head_dim**-0.5 if scale is None else scale", "  scale = head_dim**-0.5",
           "tests/test_attention_kernels.py::explicit_scale and xla"),
    Mutant("distillation KL in the wrong direction", "jaxformers/distill.py",
           "  return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)",
           "  return temperature ** 2 * jnp.sum(jnp.exp(s) * (s - t), axis=-1)",
           "tests/test_distill.py::soft_label"),
    Mutant("relation KL counts padding keys", "jaxformers/distill.py",
           "  scores = jnp.where(same_BLL[:, None], scores, -1e30)", "  scores = scores",
           "tests/test_distill.py::relation_kl"),
    Mutant("hidden-state loss ignores the layer map", "jaxformers/train/distillation.py",
           "distill.hidden_mse(s_out.hidden_states[i], t_out.hidden_states[j], valid)",
           "distill.hidden_mse(s_out.hidden_states[i], t_out.hidden_states[-1], valid)",
           "tests/test_distill.py::equal_to_its_teacher"),
    Mutant("int8 activations scaled per tensor, not per token", "jaxformers/layers/quant.py",
           "s_R1 = absmax_scale(x, axis=-1)", "s_R1 = absmax_scale(x.reshape(1, -1), axis=-1)",
           "tests/test_quantize.py::int8_dense_matches_numpy"),
    Mutant("head importance keeps the sign of the gate gradient", "jaxformers/prune.py",
           "heads[i] += np.abs(wg.reshape(len(heads[i]), -1).sum(-1))",
           "heads[i] += wg.reshape(len(heads[i]), -1).sum(-1)",
           "tests/test_prune.py::importance_is_the_gate_gradient"),
    Mutant("architecture updates during the warm-up", "jaxformers/train/search.py",
           "do_arch = (t >= warmup) & ((t - warmup) % every == 0)", "do_arch = (t - warmup) % every == 0",
           "tests/test_search.py::only_the_arch_optimizer"),
    Mutant("pruning FLOPs count half of each neuron", "jaxformers/flops.py",
           "return 4.0 * cfg.hidden_size * (cfg.intermediate_size if width is None else width)",
           "return 2.0 * cfg.hidden_size * (cfg.intermediate_size if width is None else width)",
           "tests/test_flops.py"),
    Mutant("init_from without a tokenizer gets a new WordPiece", "jaxformers/train/loop.py",
           "    elif init is not None:\n      raise ConfigError(f\"config.init_from",
           "    elif False:\n      raise ConfigError(f\"config.init_from",
           "tests/test_train_pretrained.py::without_a_tokenizer"),
    # search
    Mutant("search trains the weights on the held-out examples too", "jaxformers/train/search.py",
           "return np.sort(perm[k:]), np.sort(perm[:k])", "return np.sort(perm), np.sort(perm[:k])",
           "tests/test_search.py::heldout_split"),
    Mutant("held-out size rounded down", "jaxformers/train/search.py",
           "k = max(1, int(round(self.s.heldout_fraction * n)))", "k = max(1, int(self.s.heldout_fraction * n))",
           "tests/test_search.py::heldout_split"),
    Mutant("FLOPs penalty charges the layouts below the target", "jaxformers/train/search.py",
           "pen = s.cost_weight * jax.nn.relu(ratio - s.target_flops_ratio)",
           "pen = s.cost_weight * jax.nn.relu(s.target_flops_ratio - ratio)",
           "tests/test_search.py::flops_penalty"),
    Mutant("expected FLOPs averaged over positions", "jaxformers/train/search.py",
           "ratio = jnp.sum(probs * costs_C) / source_cost",
           "ratio = jnp.mean(jnp.sum(probs * costs_C, axis=-1)) / source_cost",
           "tests/test_search.py::flops_penalty"),
    Mutant("identity penalty pushes identity up", "jaxformers/train/search.py",
           "jax.nn.relu(jnp.mean(probs[:, ident]) - s.max_identity)",
           "jax.nn.relu(s.max_identity - jnp.mean(probs[:, ident]))",
           "tests/test_search.py::flops_penalty"),
    Mutant("held read-off keeps the first layout that fits, not the most probable", "jaxformers/search.py",
           "return list(max(fits, key=lambda e: (e[1], [-k for k in e[2]]))[2])", "return list(fits[0][2])",
           "tests/test_search.py::held_to_the_flops_budget"),
    Mutant("the trainer reads off each position's argmax despite the target", "jaxformers/train/search.py",
           'chosen = argmax if self.s.read_off == "argmax" else', 'chosen = argmax if True else',
           "tests/test_search.py::within_the_flops_target"),
    Mutant("a searched layout is arranged from the wrong positions", "jaxformers/search.py",
           "  return derive(to_supernet(model, tuple(candidates), rngs=rngs), rngs=rngs, chosen=list(chosen))",
           "  return derive(to_supernet(model, tuple(candidates), rngs=rngs), rngs=rngs, chosen=list(chosen)[::-1])",
           "tests/test_search.py::arrange_as_searched"),
    Mutant("supernet samples Gumbel noise in eval mode", "jaxformers/search.py",
           "      return jax.nn.softmax(self.logits[...].astype(jnp.float32))",
           "      return gumbel_softmax(self.logits[...], self.rngs(), self.tau[...], self.hard)",
           "tests/test_search.py::eval_mode"),
    Mutant("supernet keeps the temperature in eval mode", "jaxformers/search.py",
           "      return jax.nn.softmax(self.logits[...].astype(jnp.float32))",
           "      return jax.nn.softmax(self.logits[...].astype(jnp.float32) / self.tau[...])",
           "tests/test_search.py::eval_mode"),
    Mutant("Fourier FLOPs forget the hidden-axis DFT", "jaxformers/layers/fourier.py",
           "  return 4.0 * d * d + 4.0 * length * d", "  return 4.0 * length * d",
           "tests/test_flops.py::block_flops_match"),
    Mutant("sparse FLOPs count the window twice", "jaxformers/layers/attention.py",
           "return min(length, 2 * (cfg.sparse_window // 2) + 1 + len(cfg.sparse_global_tokens))",
           "return min(length, 2 * cfg.sparse_window + 1 + len(cfg.sparse_global_tokens))",
           "tests/test_flops.py::block_flops_match"),
    # prune
    Mutant("head scores ranked without the per-layer normalisation", "jaxformers/prune.py",
           "units = [(i, j, (s / (np.linalg.norm(s) or 1.0) if normalise else s)[j])",
           "units = [(i, j, s[j])",
           "tests/test_prune.py::l2_normalised_global_ranking"),
    Mutant("head scores normalised by their sum (L1)", "jaxformers/prune.py",
           "(s / (np.linalg.norm(s) or 1.0) if normalise else s)",
           "(s / (np.abs(s).sum() or 1.0) if normalise else s)",
           "tests/test_prune.py::l2_normalised_global_ranking"),
    Mutant("global ranking removes the most important heads", "jaxformers/prune.py",
           "order = sorted(units, key=lambda u: (u[2], u[0], u[1]))[:drop]",
           "order = sorted(units, key=lambda u: (-u[2], u[0], u[1]))[:drop]",
           "tests/test_prune.py::l2_normalised_global_ranking"),
    Mutant("per-block ranking keeps the least important", "jaxformers/prune.py",
           'keep[i] = np.sort(np.argsort(-s, kind="stable")[:len(s) - drop])',
           'keep[i] = np.sort(np.argsort(s, kind="stable")[:len(s) - drop])',
           "tests/test_prune.py::l2_normalised_global_ranking"),
    # quantize
    Mutant("int8 kernel scaled per tensor, not per output channel", "jaxformers/layers/quant.py",
           "  s = absmax_scale(k, axis=0)\n", "  s = absmax_scale(k.reshape(-1, 1), axis=0)\n",
           "tests/test_quantize.py::int8_dense_matches_numpy"),
    Mutant("int8 rounding truncates toward zero", "jaxformers/layers/quant.py",
           "return jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(jnp.int8)",
           "return jnp.clip(jnp.trunc(x / scale), -QMAX, QMAX).astype(jnp.int8)",
           "tests/test_quantize.py::int8_dense_matches_numpy"),
    Mutant("quantize drops the class names", "jaxformers/quant.py",
           "  if getattr(model, \"label_names\", None):\n    new.label_names = model.label_names\n  new.eval()\n  return new\n\n\ndef size_report",
           "  new.eval()\n  return new\n\n\ndef size_report",
           "tests/test_quantize.py::keeps_the_class_names"),
    # distill
    Mutant("relation losses at the shallowest mapped pair", "jaxformers/train/distillation.py",
           "      self.relation = both[-1]", "      self.relation = both[0]",
           "tests/test_distill.py::deepest_mapped_pair"),
    Mutant("student relations from the block's output, not its input", "jaxformers/train/distillation.py",
           "blocks[i - 1].attention_inputs(s_out.hidden_states[i - 1])",
           "blocks[i - 1].attention_inputs(s_out.hidden_states[i])",
           "tests/test_distill.py::deepest_mapped_pair"),
    Mutant("teacher relations at the student's layer", "jaxformers/train/distillation.py",
           "models.encoder_of(teacher).blocks[j - 1].attention_inputs(t_out.hidden_states[j - 1])",
           "models.encoder_of(teacher).blocks[i - 1].attention_inputs(t_out.hidden_states[i - 1])",
           "tests/test_distill.py::deepest_mapped_pair"),
    # encode
    Mutant("encode(normalize=False) normalises a sentence-transformers model anyway", "jaxformers/encode.py",
           'normalize = st.get("normalize", False) if normalize is None else normalize',
           'normalize = normalize or st.get("normalize", False)',
           "tests/test_encode.py::explicit_options and normalize"),
    Mutant("the directory's pooling wins over pooling=", "jaxformers/encode.py",
           'pooling = pooling or st.get("pooling", "cls")', 'pooling = st.get("pooling") or pooling or "cls"',
           "tests/test_encode.py::explicit_options and pooling"),
    Mutant("the directory's max_seq_length wins over max_length=", "jaxformers/encode.py",
           'max_length = min(max_length or st.get("max_length") or limit, limit)',
           'max_length = min(st.get("max_length") or max_length or limit, limit)',
           "tests/test_encode.py::explicit_options and max_length"),
    # conversion and export
    Mutant("id2label read in string order", "jaxformers/convert/hf.py",
           "names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))",
           "names = tuple(str(id2label[k]) for k in sorted(id2label))",
           "tests/test_convert.py::twelve_labels"),
    Mutant("export writes the class names sorted", "jaxformers/convert/hf.py",
           "names = list(label_names) if label_names and len(label_names) == num_labels else",
           "names = sorted(label_names) if label_names and len(label_names) == num_labels else",
           "tests/test_convert.py::twelve_labels"),
    Mutant("attention reads the host's backend, not the target", "jaxformers/kernels/attention/api.py",
           "  target = current_target() if target is None else as_target(target)",
           "  target = __import__('jaxformers.targets').targets.host_target() if target is None else as_target(target)",
           "tests/test_targets.py::holds_its_kernels"),
    Mutant("a chip without a kernel lowering still takes the kernels", "jaxformers/kernels/attention/dispatch.py",
           "  if target.kernel_backend is None:\n    log_once", "  if False:\n    log_once",
           "tests/test_targets.py::falls_back_to_xla"),
    Mutant("sparse attention asks the host whether the kernel runs", "jaxformers/layers/attention.py",
           "    target = current_target()\n    leading", "    target = __import__('jaxformers.targets').targets.host_target()\n    leading",
           "tests/test_targets.py::holds_its_kernels"),
]


def prepare(dst: Path) -> None:
  for name in COPY:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    else:
      shutil.copy2(src, dst / name)


def apply(m: Mutant, dst: Path) -> None:
  path = dst / m.file
  text = path.read_text()
  n = text.count(m.old)
  if n != 1:
    raise SystemExit(f"mutant {m.name!r}: the text to replace occurs {n} times in {m.file} (expected exactly once); "
                     f"update MUTANTS in tests/mutation_check.py to the current source:\n{m.old}")
  path.write_text(text.replace(m.old, m.new))


def run_tests(m: Mutant, dst: Path, timeout: int) -> tuple[bool, str, float]:
  target, _, select = m.test.partition("::")
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", target]
  cmd += ["-k", select] if select else []
  env = dict(os.environ, PYTHONPATH=str(dst))
  env.pop("JAXFORMERS_UPDATE_SNAPSHOTS", None)
  t0 = time.time()
  try:
    p = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return False, "timeout", time.time() - t0
  out = p.stdout + p.stderr
  if p.returncode == 5:
    raise SystemExit(f"mutant {m.name!r}: `{' '.join(cmd[3:])}` selected no test")
  failed = [l.split()[1] for l in out.splitlines() if l.startswith("FAILED ")]
  if p.returncode == 1 and failed:
    return True, failed[0].split("::", 1)[1], time.time() - t0
  tail = [l for l in out.splitlines() if " passed" in l or " failed" in l or "error" in l.lower()][-1:]
  return False, (tail[0] if tail else out[-300:]), time.time() - t0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("-k", default="", help="only mutants whose name contains this text")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
  ap.add_argument("--list", action="store_true", help="check that every substitution applies, run no test")
  args = ap.parse_args(argv)
  chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
  if not chosen:
    raise SystemExit(f"no mutant matches {args.k!r}")
  rows = []
  with tempfile.TemporaryDirectory(prefix="jaxformers-mutants-") as tmp:
    base = Path(tmp) / "clean"
    base.mkdir()
    prepare(base)
    for m in chosen:                       # every substitution must apply before any test runs
      apply(m, _scratch(base, tmp, m))
    if args.list:
      for m in chosen:
        print(f"{m.name}: {m.file} -> {m.test}")
      return 0
    for i, m in enumerate(chosen):
      dst = Path(tmp) / f"m{i}"
      shutil.copytree(base, dst)
      apply(m, dst)
      caught, detail, secs = run_tests(m, dst, args.timeout)
      rows.append((m, caught, detail.strip()))
      print(f"[{i + 1}/{len(chosen)}] {m.name}: {'caught by ' if caught else 'SURVIVED: '}{detail.strip()} "
            f"({secs:.0f}s)", flush=True)
      shutil.rmtree(dst, ignore_errors=True)
  print()
  print("| mutant | file | tests run (`file::-k`) | first failing test |")
  print("|---|---|---|---|")
  for m, caught, detail in rows:
    print(f"| {m.name} | `{m.file}` | `{m.test}` | {f'`{detail}`' if caught else '**SURVIVED**'} |")
  survived = [m.name for m, caught, _ in rows if not caught]
  print(f"\n{len(rows) - len(survived)} of {len(rows)} mutants caught" + (f"; survived: {', '.join(survived)}"
                                                                      if survived else ""))
  return 1 if survived else 0


def _scratch(base: Path, tmp: str, m: Mutant) -> Path:
  """A throwaway copy of the one file ``m`` changes, to check the substitution applies."""
  d = Path(tempfile.mkdtemp(dir=tmp))
  (d / m.file).parent.mkdir(parents=True, exist_ok=True)
  shutil.copy2(base / m.file, d / m.file)
  return d


if __name__ == "__main__":
  sys.exit(main())
