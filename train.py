"""Train, evaluate or predict with jaxformers.

  python train.py --config configs/default.py --workdir /tmp/run
  python train.py --config configs/glue.py:task=rte,layout=parallel*12 --config.init_from=CKPT \
      --config.optim.lr=2e-5 --workdir /tmp/rte
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, summary.json")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (one process per host; "
                                "coordinator from the cluster, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                                "JAX_PROCESS_ID)")
flags.mark_flags_as_required(["config", "workdir"])


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    from jaxformers.train.cli import explain_override
    print(f"train.py: {explain_override(argv, e)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if _MULTIHOST.value:
    import jax
    jax.distributed.initialize()
  from jaxformers.train.cli import main as run_main
  sys.exit(run_main(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
