"""Every error jaxformers raises on purpose, on the ground floor: any module may raise or catch one without importing
the module that usually raises it. Each message names the file, key or value at fault and what would be accepted."""
from __future__ import annotations

import signal


class ConfigError(ValueError):
  """A configuration key or value that the trainer does not accept; the message names it and what is accepted."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message says what and where."""


class CheckpointMismatch(ValueError):
  """The checkpoint in the workdir was written for another model or configuration."""


class DataError(ValueError):
  """Bad input data: the message names the file, column or value at fault."""


class LayoutError(ValueError):
  """A block layout that does not parse or names an unknown block type."""


class PruneError(ValueError):
  """A pruning target that cannot be met (the message names the value and what is accepted)."""


class WorkdirLocked(RuntimeError):
  """Another live process trains in this workdir (the message names its pid and host)."""


class NonFiniteLoss(RuntimeError):
  """The training loss became NaN or Inf; nothing after the last good checkpoint was saved."""


class Interrupted(RuntimeError):
  """SIGTERM / SIGINT arrived; a checkpoint was saved first."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, "
                     f"run the same command to resume")
    self.signum = signum
