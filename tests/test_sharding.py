"""The logical-axis rules table: every rule places some parameter, every parameter's axes have a rule, spec_for /
state_shardings place arrays as documented, and config.mesh.rules (the table's defaults) changes a run's placement."""
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.layout import BLOCKS
from jaxformers.train import sharding

FAKE = types.SimpleNamespace(shape={"data": 2, "fsdp": 4})


def all_logical_axes():
  cfg = EncoderConfig(vocab_size=64, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=16,
                      layout=",".join(BLOCKS.names()))
  seen = set()
  for task in models.TASKS:
    model = nnx.eval_shape(lambda: models.build(task, cfg, num_labels=3))
    for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = v.get_metadata().get("logical_axes")
      assert axes is not None and len(axes) == len(v.shape), v
      seen.update(a for a in axes if a is not None)
  return seen


def test_rules_and_parameters_name_the_same_axes():
  assert all_logical_axes() == {name for name, _ in sharding.LOGICAL_AXIS_RULES}


def test_spec_for_shards_the_first_dimension_that_divides():
  assert sharding.spec_for((64, 16), ("vocab", "embed"), FAKE) == P("fsdp", None)
  assert sharding.spec_for((30, 16), ("vocab", "embed"), FAKE) == P(None, "fsdp")       # 30 % 4 != 0
  assert sharding.spec_for((30, 18), ("vocab", "embed"), FAKE) == P(None, None)
  assert sharding.spec_for((16, 3), ("embed", "labels"), FAKE) == P("fsdp", None)
  assert sharding.spec_for((512, 16), ("position", "embed"), FAKE) == P(None, "fsdp")   # position: never sharded
  assert sharding.spec_for((16,), None, FAKE) == P(None)
  one = types.SimpleNamespace(shape={"data": 8, "fsdp": 1})
  assert sharding.spec_for((64, 16), ("vocab", "embed"), one) == P(None, None)          # fsdp=1: replicated


def test_optimizer_moments_follow_their_parameter():
  mesh = sharding.make_mesh(1, 1)
  cfg = EncoderConfig(vocab_size=64, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=16,
                      layout="serial*1")
  model = nnx.eval_shape(lambda: models.SequenceClassifier(cfg, 3, rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  psh = sharding.param_shardings(params, mesh)
  tx = optax.adamw(1e-3)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "rngs": rest,
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  sh = sharding.state_shardings(state, psh, mesh)
  mu = sh["opt_state"][0].mu
  assert jax.tree.structure(mu, is_leaf=lambda x: hasattr(x, "spec")) == \
      jax.tree.structure(psh, is_leaf=lambda x: hasattr(x, "spec"))
  assert sh["step"].spec == P()


def test_make_mesh_checks_the_device_count():
  n = jax.device_count()
  assert sharding.make_mesh(-1, 1).shape == {"data": n, "fsdp": 1}
  assert sharding.make_mesh(-1, -1).shape == {"data": 1, "fsdp": n}
  with pytest.raises(ValueError, match=rf"mesh.data=3 x mesh.fsdp=5 does not match the {n} available devices"):
    sharding.make_mesh(3, 5)


def test_the_rules_are_a_config_default():
  from jaxformers.train.defaults import base_config
  rules = base_config().mesh.rules
  assert dict(sharding.rules_from(rules)) == dict(sharding.LOGICAL_AXIS_RULES)
  assert rules.vocab == "fsdp" and rules.position == ""


@pytest.mark.parametrize("override,message", [
    ("mesh.rules.vocab=model", "config.mesh.rules.vocab='model': expected a mesh axis (data, fsdp) or '' (never "
                               "sharded)"),
    ("mesh.rules.embed=fsdp,data", "config.mesh.rules.embed='fsdp,data': expected a mesh axis (data, fsdp)"),
])
def test_a_bad_rule_is_refused_naming_it_and_the_mesh_axes(tmp_path, override, message):
  from jaxformers.train import ConfigError
  from jaxformers.train.cli import apply_overrides
  from jaxformers.train.loop import Run
  from tests.train_helpers import load_config
  c = load_config("tiny")
  apply_overrides(c, [override])
  with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    Run(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_bad_rule_on_the_train_py_command_line_is_one_line(tmp_path):
  import subprocess
  import sys
  from tests.train_helpers import ROOT
  p = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--config.mesh.rules.mlp=tensor",
                      f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines() == [
      "train.py: error: config.mesh.rules.mlp='tensor': expected a mesh axis (data, fsdp) or '' (never sharded)"]


RULES_SCRIPT = r"""
import json, sys
import jax
assert jax.device_count() == 8, jax.devices()
sys.path.insert(0, {root!r})
from tests.train_helpers import load_config
from jaxformers.train import run
from jaxformers.train.cli import apply_overrides
from jaxformers.train.loop import Run

def specs(r):
  flat = jax.tree_util.tree_flatten_with_path(r.param_sh, is_leaf=lambda x: hasattr(x, "value"))[0]
  return {{jax.tree_util.keystr(p): str(tuple(v.value.spec)) for p, v in flat}}

out = {{}}
for name, overrides in (("default", []), ("override", ["mesh.rules.heads=", "mesh.rules.embed=data", "mesh.rules.vocab="])):
  c = load_config("tiny", "steps=2", mesh__data=2, mesh__fsdp=4)
  apply_overrides(c, overrides)
  out[name] = specs(Run(c, {tmp!r} + "/probe"))
  if overrides:
    out["summary"] = run(c, {tmp!r} + "/run")
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_a_rules_override_changes_the_parameter_sharding(tmp_path):
  """On 8 CPU devices (data 2 x fsdp 4): by default the attention output kernel (heads, embed) and the word
  embeddings (vocab, embed) are sharded over fsdp on their first dimension; with heads and vocab never sharded and
  embed on the data axis, over data on their embed dimension, and a run trains with that placement."""
  import json
  import os
  import subprocess
  import sys
  from tests.train_helpers import ROOT
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", RULES_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path))], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(p.stdout.split("RESULT", 1)[1])
  out_kernel = "['encoder']['blocks'][0]['mixer']['out']['kernel']"
  words = "['encoder']['embeddings']['word']['embedding']"                  # (vocab 400, embed 32)
  assert res["default"][out_kernel] == "('fsdp', None)"
  assert res["override"][out_kernel] == "(None, 'data')"
  assert res["default"][words] == "('fsdp', None)"
  assert res["override"][words] == "(None, 'data')"
  assert res["summary"]["steps"] == 2 and res["summary"]["mesh"] == {"data": 2, "fsdp": 4}
