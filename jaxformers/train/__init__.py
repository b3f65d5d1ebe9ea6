"""Training: pure jitted steps over a device mesh, the loop, orbax checkpoints, metrics."""
from jaxformers.train.defaults import ConfigError, base_config
from jaxformers.train.loop import Interrupted, NonFiniteLoss, run

__all__ = ["run", "base_config", "ConfigError", "Interrupted", "NonFiniteLoss"]
