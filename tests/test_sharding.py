"""The logical-axis rules table: every rule places some parameter, every parameter's axes have a rule, and
spec_for / state_shardings place arrays as documented."""
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
