"""What a task's hooks are given by the trainer: plain, frozen values, never the trainer's own objects.

:class:`TaskContext` is built once a run knows its tokenizer, model and mesh (:class:`jaxformers.train.loop.Run`)
and handed to every hook of :class:`jaxformers.train.tasks.Task` that needs more than its own settings. A hook
that wants to change what the trainer does returns a value (a model, batches, summary entries, a :class:`FollowUp`)
and the trainer applies it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class TaskContext:
  """The run as the task's hooks see it.

  ``workdir``: the run's directory. ``data``: ``config.data`` (frozen). ``init_from``: ``config.init_from`` (""
  for a model trained from scratch). ``model_config``: the :class:`jaxformers.config.EncoderConfig` of the model
  trained. ``max_length``: tokens a sequence may have (``data.max_length``, at most the model's positions).
  ``tokenizer`` and ``special`` (token kind -> id or None, read-only). ``mesh`` and ``rules`` (logical axis ->
  mesh axis) place arrays as the run's parameters are placed. ``graphdef``: the eval-mode graph of the run's model
  (split by the task's ``param_filter``). ``blocks_with_attention``: per encoder block of that model, whether it
  has an attention a distillation can read.
  """
  workdir: Path
  data: Any
  init_from: str
  model_config: Any
  max_length: int
  tokenizer: Any
  special: Mapping[str, int | None]
  mesh: Any
  rules: Any
  graphdef: Any
  blocks_with_attention: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class FollowUp:
  """A run the trainer starts once this run's training has finished (e.g. training the model a search derived):
  ``run(config, workdir)``; its result goes back to the task (:meth:`jaxformers.train.tasks.Task.record_follow_up`)."""
  config: Any
  workdir: Path
