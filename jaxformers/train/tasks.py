"""Every task the trainer can run, and :func:`make_task`, the one place that builds them.

The task kinds and the interface the trainer calls live in :mod:`jaxformers.train.task_base`; the tasks that
change how another one trains in their own modules: distillation (:mod:`jaxformers.train.distillation`) and
architecture search (:mod:`jaxformers.train.search`). Their names are importable from here.
"""
from __future__ import annotations

from jaxformers.data import sources
from jaxformers.train.context import FollowUp, TaskContext
from jaxformers.train.distillation import Distillation, Distilled, Heal
from jaxformers.train.search import Searched
from jaxformers.train.task_base import TASKS, Classification, MaskedLM, Regression, Task, TaskWrapper, TextTask, forward

__all__ = ["TASKS", "Task", "TaskWrapper", "Classification", "Regression", "TextTask", "MaskedLM", "Distillation",
           "Distilled", "Heal", "Searched", "TaskContext", "FollowUp", "forward", "make_task"]


def make_task(c) -> Task:
  """The task ``config.task`` names, on the data ``config.data`` describes; a supervised task follows its data's
  labels (one label = a regression, whatever ``config.task`` says). With ``config.distill.teacher`` set, the task
  also learns from that teacher (:class:`Distilled`); ``task=heal`` learns from it alone. With
  ``config.search.enabled`` the run is an architecture search on that task (:class:`Searched`)."""
  source = sources.get_source(c.data)
  source.check(c.data)
  name = c.task
  if name in ("classification", "regression"):
    name = "regression" if source.labels(c.data).regression else "classification"
  task = TASKS.get(name)(source, c)
  if c.distill.teacher and not isinstance(task, Heal):
    task = Distilled(task, c.distill)
  if c.search.enabled:
    task = Searched(task, c)
  return task
