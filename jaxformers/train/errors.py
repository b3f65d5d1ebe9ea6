"""The trainer's error for a configuration it cannot use."""


class ConfigError(ValueError):
  """A configuration key or value that the trainer does not accept; the message names it and what is accepted."""
