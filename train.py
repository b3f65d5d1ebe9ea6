"""Train, evaluate or predict with jaxformers.

  python train.py --config configs/default.py --workdir /tmp/run
  python train.py --config configs/glue.py:task=rte,layout=parallel*12 --config.init_from=CKPT \
      --config.optim.lr=2e-5 --workdir /tmp/rte
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, summary.json")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (one process per host); "
                                "on SLURM, Open MPI, Kubernetes and Cloud TPU it finds its peers itself, elsewhere "
                                "give the three flags below")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "with --multihost: host:port of process 0 "
                                   "(default: $JAX_COORDINATOR_ADDRESS, else the cluster's)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --multihost: how many processes "
                                      "(default: $JAX_NUM_PROCESSES, else the cluster's)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --multihost: this process's index "
                                   "(default: $JAX_PROCESS_ID, else the cluster's)")
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

    def env_int(name):
      return int(os.environ[name]) if os.environ.get(name) else None
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes=_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else env_int("JAX_NUM_PROCESSES"),
        process_id=_PROCESS_ID.value if _PROCESS_ID.value is not None else env_int("JAX_PROCESS_ID"))
  from jaxformers.train.cli import main as run_main
  sys.exit(run_main(_CONFIG.value, _WORKDIR.value, sys.argv))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
