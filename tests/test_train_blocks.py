"""Each block type trains on the tiny config and its loss falls; the MLM task trains too."""
import numpy as np
import pytest

from jaxformers.train import run
from tests.train_helpers import load_config, train_losses

LAYOUTS = ["serial*2", "parallel*2", "fourier*1,serial*1", "serial*1,ffn*1"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_layout_loss_falls(tmp_path, layout):
  c = load_config("tiny", f"layout={layout},steps=30", optim__lr=1e-2)
  out = run(c, tmp_path)
  losses = [v for _, v in sorted(train_losses(tmp_path).items())]
  assert len(losses) == 30
  assert np.all(np.isfinite(losses))
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert last < first - 0.2, (layout, first, last)
  assert out["steps"] == 30 and out["num_params"] > 0
  # held-out accuracy after 30 steps on 64 examples is near chance (measured 0.11-0.27), so it guards nothing here;
  # test_train_default checks the held-out accuracy of the full default schedule


def test_mlm_loss_falls(tmp_path):
  c = load_config("tiny", "task=mlm,steps=20", data__max_length=32)
  out = run(c, tmp_path)
  losses = [v for _, v in sorted(train_losses(tmp_path).items())]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
  assert out["eval"]["validation/perplexity"] == pytest.approx(np.exp(out["eval"]["validation/loss"]), rel=1e-12)
