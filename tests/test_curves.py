"""TensorBoard curves: event files read back with TensorBoard's own loader."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from pbas_jax import curves


@pytest.fixture(name="read_scalars")
def _read_scalars():
  require(importlib.util.find_spec("tensorboard") is not None,
          "tensorboard missing: install the test extra")
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator

  def read(directory):
    """{tag: [(step, value)]} as TensorBoard's Python loader shows them (purging included)."""
    acc = event_accumulator.EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

  return read


def test_scalars_are_written_per_step_and_non_numbers_skipped(tmp_path, read_scalars):
  with curves.open_writer(str(tmp_path), first_step=0) as writer:
    for epoch in range(3):
      writer.write(epoch, {"train/loss_n": 0.5 / (epoch + 1), "train/p_true": np.float32(0.25),
                           "steps": epoch * 10, "test/image_auroc": None, "note": "text",
                           "map": np.ones(3), "r": jnp.asarray(epoch + 0.5)})
  assert os.listdir(tmp_path) == [curves.TENSORBOARD_DIR]
  scalars = read_scalars(tmp_path / curves.TENSORBOARD_DIR)
  assert sorted(scalars) == ["r", "steps", "train/loss_n", "train/p_true"]
  np.testing.assert_allclose([v for _, v in scalars["train/loss_n"]], [0.5, 0.25, 0.5 / 3],
                             rtol=1e-7)
  assert [s for s, _ in scalars["train/loss_n"]] == [0, 1, 2]
  assert scalars["steps"] == [(0, 0.0), (1, 10.0), (2, 20.0)]
  assert scalars["r"] == [(0, 0.5), (1, 1.5), (2, 2.5)]
  assert scalars["train/p_true"] == [(0, 0.25), (1, 0.25), (2, 0.25)]


def test_points_are_on_disk_after_flush(tmp_path, read_scalars):
  writer = curves.open_writer(str(tmp_path), first_step=0)
  writer.write(4, {"loss": 1.0})
  writer.flush()
  assert read_scalars(tmp_path / curves.TENSORBOARD_DIR) == {"loss": [(4, 1.0)]}
  writer.close()
  writer.close()
  with pytest.raises(RuntimeError, match="closed"):
    writer.write(5, {"loss": 2.0})


def test_resume_replaces_the_points_from_first_step(tmp_path, read_scalars):
  """A run interrupted after epoch 5 with its last checkpoint at epoch 2 resumes at epoch 3."""
  with curves.open_writer(str(tmp_path), first_step=0) as writer:
    for epoch in range(6):
      writer.write(epoch, {"loss": float(epoch), "test/auroc": 0.5 if epoch % 2 else None})
  with curves.open_writer(str(tmp_path), first_step=3) as writer:
    for epoch in range(3, 5):
      writer.write(epoch, {"loss": 10.0 + epoch})
  assert len(os.listdir(tmp_path / curves.TENSORBOARD_DIR)) == 2
  scalars = read_scalars(tmp_path / curves.TENSORBOARD_DIR)
  assert scalars["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
  # The Python loader drops every tag's points >= first_step; the default (Rust) loader drops a
  # tag's only once that tag is written again (documented in pbas_jax/curves.py).
  assert scalars["test/auroc"] == [(1, 0.5)]


def test_a_fresh_run_in_a_reused_directory_hides_the_old_curves(tmp_path, read_scalars):
  for offset in (0.0, 100.0):
    with curves.open_writer(str(tmp_path), first_step=0) as writer:
      for epoch in range(3):
        writer.write(epoch, {"loss": offset + epoch})
  scalars = read_scalars(tmp_path / curves.TENSORBOARD_DIR)
  assert scalars["loss"] == [(0, 100.0), (1, 101.0), (2, 102.0)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with curves.open_writer(str(tmp_path), first_step=0) as writer:
    writer.write(0, {"loss": 1.0})
    writer.flush()
  assert not os.listdir(tmp_path)


def test_writing_imports_neither_torch_nor_tensorflow(tmp_path):
  code = ("import sys\n"
          "from pbas_jax import curves\n"
          f"with curves.open_writer({str(tmp_path)!r}, 0) as w:\n"
          "  w.write(1, {'loss': 1.0})\n"
          "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == "[]"
  assert len(os.listdir(tmp_path / curves.TENSORBOARD_DIR)) == 1


def test_reported_evaluation_joins_the_curves_once(tmp_path, read_scalars):
  # eval.every_epochs=0: training logged epochs 1-3 without test metrics; the final evaluation is
  # merged into epoch 3's line and curves, once (a rerun or eval.only adds nothing).
  class_dir = tmp_path / "cls"
  log = curves.EpochLog(str(class_dir), [str(class_dir)], 0)
  for epoch in (1, 2, 3):
    log.write(0, {"epoch": epoch, "run": 0, "seed": 0, "alpha": 0.25, "loss": 1.0 / epoch})
  log.close()
  final = {"epoch": 3, "run": 0, "seed": 0, "alpha": 0.25, "test_i_auroc": 0.75,
           "test_p_pro": None}
  for _ in range(2):
    curves.log_evaluation(str(class_dir), [str(class_dir)], [final])
  lines = [json.loads(line) for line in (class_dir / "metrics.jsonl").read_text().splitlines()]
  assert [line["epoch"] for line in lines] == [1, 2, 3]
  assert lines[2] == {**final, "loss": 1.0 / 3} and "test_i_auroc" not in lines[1]
  scalars = read_scalars(class_dir / curves.TENSORBOARD_DIR)
  assert scalars["test/i_auroc"] == [(3, 0.75)]
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]  # epoch 3 kept, not purged
  # An epoch already evaluated in training keeps its line.
  curves.log_evaluation(str(class_dir), [str(class_dir)], [dict(final, test_i_auroc=0.5)])
  assert json.loads((class_dir / "metrics.jsonl").read_text().splitlines()[2]) == lines[2]
