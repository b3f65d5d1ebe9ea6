"""Re-arranging and re-heading a jaxformers model directly, by the rules HF checkpoints follow.

The source names are the model's own parameter paths (without the ``encoder.`` prefix of
head models), and every path the families' HF tables name becomes a rule that maps it to the same
candidates: ``blocks.{i}.mixer.query.kernel`` goes to the ``mixer.query.kernel`` of the
block :func:`jaxformers.convert.engine.layer_map` picks for source block ``i``'s token mixer,
``blocks.{i}.mlp_norm`` / ``blocks.{i}.norm`` (a parallel block's single norm) go with the
feed-forward to ``mlp_norm`` or ``norm``, embeddings, pooler and heads keep their names.
Attention and sparse mixers share their parameters; a Fourier mixer has none, so its
``mixer_norm`` is all it passes on, and attention taking its place is newly initialised.
"""
from __future__ import annotations

from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.convert.engine import Report, Rule, norm
from jaxformers.convert.families import families
from jaxformers.convert.hf import LABELLED, fill_model
from jaxformers.errors import CheckpointError
from jaxformers.layout import BLOCKS
from jaxformers.params import get_params


def _rules() -> list[Rule]:
  out: dict[str, Rule] = {}
  named = [r for f in families() for r in f.all_rules()] + norm("final_norm", "final_norm")
  for r in named:
    for own in r.jax:
      out.setdefault(own, Rule(own, (own,) + tuple(c for c in r.jax if c != own), "copy", r.group, r.base))
  return list(out.values())


RULES = _rules()


def _may_be_new(path: str) -> bool:
  """Everything but the embeddings (which every model has) may lack a source in a re-arrangement."""
  return not path.startswith(("embeddings.", "encoder.embeddings."))


def rearrange(model, *, layout: str | None = None, task: str | None = None, num_labels: int | None = None,
              head: str | None = None, rngs=None, where: str = "model", progress: bool = False,
              **overrides) -> tuple[object, Report]:
  """A new model with ``model``'s weights in another ``layout`` and/or with another head; returns ``(model, report)``.

  ``overrides`` set other :class:`EncoderConfig` fields (e.g. ``max_position_embeddings``, which
  extends the position table). Tensors the new layout has no place for are reported as dropped,
  parameters nothing fills (new attention where the source had Fourier mixing, a new head) as new. An int8 model
  is refused (:class:`CheckpointError`).
  """
  cfg: EncoderConfig = model.config
  if cfg.quantization != "none":     # its int8 kernels and scales have no conversion rules
    raise CheckpointError(f"{where}: an {cfg.quantization} model cannot be re-laid out or given another head or "
                          f"config; do that to the float model, then quantize it")
  source_task = models.task_of(model)
  task = task or source_task
  source_labels = getattr(model, "num_labels", None) if source_task in LABELLED else None
  if num_labels is None and task in LABELLED:
    num_labels = source_labels or 2
  if head is None and task == source_task == "classification":
    head = model.classifier.style
  try:
    target = cfg.replace(layout=layout or cfg.layout, **overrides)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e}") from None
  prefix = "" if source_task == "base" else "encoder."
  params = get_params(model)
  original = {k[len(prefix):] if k.startswith(prefix) else k: k for k in params}
  state = {k: params[v] for k, v in original.items()}
  return fill_model(state, RULES, [], cfg=target, task=task, num_labels=num_labels, head=head, rngs=rngs,
                    source_blocks=[BLOCKS.get(b) for b in cfg.blocks], source_labels=source_labels,
                    position_key="embeddings.position.embedding", may_be_new=_may_be_new, where=where,
                    progress=progress, display=original.__getitem__)
