"""A checkpoint is refused for another model or configuration, naming what differs."""
import pytest

from jaxformers.train.checkpoint import CheckpointMismatch, compare_meta

META = {"model_config": {"hidden_size": 32, "layout": "serial*2"}, "task": "classification", "num_labels": 9,
        "param_shapes": {"['encoder']['x']": [4, 4]}}


def test_identical_metadata_passes():
  compare_meta(META, dict(META), "DIR")


@pytest.mark.parametrize("change,message", [
    ({"model_config": {"hidden_size": 64, "layout": "serial*2"}}, "model config hidden_size: checkpoint has 32, this "
                                                                  "run has 64"),
    ({"task": "mlm"}, "task: checkpoint has 'classification', this run has 'mlm'"),
    ({"num_labels": 3}, "num_labels: checkpoint has 9, this run has 3"),
    ({"param_shapes": {"['encoder']['x']": [4, 8]}}, "parameter ['encoder']['x']: checkpoint has shape [4, 4], this "
                                                     "run has [4, 8]"),
    ({"param_shapes": {}}, "parameter ['encoder']['x']: checkpoint has shape [4, 4], this run has None"),
])
def test_each_difference_is_named(change, message):
  with pytest.raises(CheckpointMismatch, match=r"checkpoint in DIR was written for another model") as e:
    compare_meta(META, dict(META, **change), "DIR")
  assert message in str(e.value) and "Use a fresh --workdir" in str(e.value)


def test_many_differences_are_counted():
  many = {f"f{i}": i for i in range(8)}    # 8 entries this run lacks + 2 it has that the checkpoint lacks
  with pytest.raises(CheckpointMismatch, match=r"\(and 5 more\)"):
    compare_meta(dict(META, model_config=many), META, "DIR")
