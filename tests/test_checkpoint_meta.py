"""A checkpoint is refused for another model or configuration, naming what differs."""
import dataclasses

import jax
import pytest

from jaxformers.config import EncoderConfig
from jaxformers.train.checkpoint import CheckpointMismatch, compare_meta

META = {"model_config": {"hidden_size": 32, "layout": "serial*2"}, "task": "classification", "num_labels": 9,
        "param_shapes": {"encoder.x": [4, 4]}}


def test_identical_metadata_passes():
  compare_meta(META, dict(META), "DIR")


@pytest.mark.parametrize("change,message", [
    ({"model_config": {"hidden_size": 64, "layout": "serial*2"}}, "model config hidden_size: checkpoint has 32, this "
                                                                  "run has 64"),
    ({"task": "mlm"}, "task: checkpoint has 'classification', this run has 'mlm'"),
    ({"num_labels": 3}, "num_labels: checkpoint has 9, this run has 3"),
    ({"param_shapes": {"encoder.x": [4, 8]}}, "parameter encoder.x: checkpoint has shape [4, 4], this run has [4, 8]"),
    ({"param_shapes": {}}, "parameter encoder.x: checkpoint has shape [4, 4], this run has None"),
])
def test_each_difference_is_named(change, message):
  with pytest.raises(CheckpointMismatch, match=r"checkpoint in DIR was written for another model") as e:
    compare_meta(META, dict(META, **change), "DIR")
  assert message in str(e.value) and "Use a fresh --workdir" in str(e.value)


def test_many_differences_are_counted():
  many = {f"['encoder']['f{i}']": [i] for i in range(8)}    # 8 parameters this run lacks + 1 it has
  with pytest.raises(CheckpointMismatch, match=r"\(and 4 more\)"):
    compare_meta(dict(META, param_shapes=many), META, "DIR")


def test_runtime_fields_do_not_block_a_restore():
  changed = {"hidden_size": 32, "layout": "serial*2", "dtype": "bfloat16", "hidden_dropout": 0.3,
             "attention_impl": "xla", "fourier_impl": "matmul", "fuse_projections": True, "sparse_window": 8,
             "quant_aware": True, "initializer_range": 0.5}
  compare_meta(META, dict(META, model_config=changed), "DIR")


def test_a_field_older_metadata_lacks_takes_its_default():
  full = dict(META, model_config=EncoderConfig(hidden_size=32, num_heads=2, layout="serial*2").to_dict())
  older = dict(full, model_config={k: v for k, v in full["model_config"].items()
                                   if k not in ("family", "use_pooler", "quantization", "quant_aware")})
  compare_meta(older, full, "DIR")
  compare_meta(full, older, "DIR")
  with pytest.raises(CheckpointMismatch, match=r"model config family: checkpoint has 'bert', this run has 'roberta'"):
    compare_meta(older, dict(full, model_config=dict(full["model_config"], family="roberta")), "DIR")


def test_saved_fields_this_version_does_not_know_are_not_compared():
  compare_meta(dict(META, model_config=dict(META["model_config"], retired_option=3)), META, "DIR")


@dataclasses.dataclass(frozen=True)
class NewerConfig(EncoderConfig):
  """EncoderConfig as a later version may have it: one more field, with a default."""
  rotary_base: float = 0.0


def test_a_field_added_after_the_checkpoint_was_saved():
  saved = dict(META, model_config=EncoderConfig(hidden_size=32, num_heads=2, layout="serial*2").to_dict())
  now = dict(saved, model_config=NewerConfig(hidden_size=32, num_heads=2, layout="serial*2").to_dict())
  assert "rotary_base" in now["model_config"] and "rotary_base" not in saved["model_config"]
  compare_meta(saved, now, "DIR", NewerConfig)
  other = dict(now, model_config=dict(now["model_config"], rotary_base=1e4))
  with pytest.raises(CheckpointMismatch, match=r"model config rotary_base: checkpoint has 0.0, this run has 10000.0"):
    compare_meta(saved, other, "DIR", NewerConfig)


def test_the_head_is_compared_when_both_name_it():
  compare_meta(META, dict(META, model_task="classification"), "DIR")       # older metadata without model_task
  with pytest.raises(CheckpointMismatch, match=r"model_task: checkpoint has 'classification', this run has 'base'"):
    compare_meta(dict(META, model_task="classification"), dict(META, model_task="base"), "DIR")


def test_shapes_saved_under_the_older_key_form_are_read():
  """States saved before parameter paths were dotted keep keys such as ['encoder']['blocks'][0]...value."""
  import jax.numpy as jnp
  from flax import nnx
  from jaxformers import models
  from jaxformers.params import param_shapes
  cfg = EncoderConfig(vocab_size=40, hidden_size=16, layout="serial*1", num_heads=2, intermediate_size=32,
                      max_position_embeddings=16)
  state = nnx.state(models.build("classification", cfg, num_labels=3), nnx.Param)
  older = {jax.tree_util.keystr(p): list(jnp.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert "['encoder']['blocks'][0]['mixer']['query']['kernel'].value" in older
  now = dict(META, param_shapes=param_shapes(state))
  compare_meta(dict(now, param_shapes=older), now, "DIR")
  older["['classifier']['out']['kernel'].value"] = [16, 2]
  with pytest.raises(CheckpointMismatch, match=r"parameter classifier\.out\.kernel: checkpoint has shape \[16, 2\], "
                                               r"this run has \[16, 3\]"):
    compare_meta(dict(now, param_shapes=older), now, "DIR")
