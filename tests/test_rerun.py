"""Reruns finish what a crashed run did not: a crash (or kill -9) at any stage after training, a
test_oracle run replayed after a resume; changed data stops a resume and is noted for a finished
class; a diverging run stops alone and is reported as diverged."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_trees
from pbas_jax import checkpoint
from pbas_jax import config_base
from pbas_jax import engine
from pbas_jax import experiment
from pbas_jax import heatmaps
from pbas_jax import inference
from pbas_jax import metrics as metrics_lib
from pbas_jax import report
from pbas_jax import sharding
from test_engine import _config as engine_config
from test_engine import _split
from test_sharding import assert_states_close
from test_sharding import clustered

REPO = pathlib.Path(__file__).resolve().parents[1]
# Settings of the small main job (32 px, resnet18 with random weights, 2 runs, 3 epochs) as
# command-line overrides, so that the kill -9 test runs the very same job in a subprocess.
OVERRIDES = {
    "backbone.name": "resnet18", "backbone.pretrain_dim": 64, "backbone.target_dim": 64,
    "model.disc_hidden": 32, "dataset.image_size": 32, "dataset.resize": 32,
    "dataset.classes": "bottle", "dataset.batch_size": 4, "train.epochs": 3,
    "train.num_runs": 2, "train.checkpoint_every": 1, "eval.heatmaps": 1,
}
TIMING = ("wall_time_s", "images_per_s")


class Crash(Exception):
  """Stands for a kill: raised inside the main job."""


def test_saving_a_saved_epoch_again_keeps_or_replaces_it(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "model", max_to_keep=None)
  state = {"w": jnp.arange(3.0)}
  ckpt.save(3, state, {"epoch": 3, "data": {"a": [1]}})
  step_dir = tmp_path / "model" / "3"
  before = step_dir.stat().st_mtime_ns
  ckpt.save(3, {"w": jnp.zeros(3)}, {"epoch": 3, "data": {"a": [1]}})  # a rerun: kept as it is
  assert step_dir.stat().st_mtime_ns == before
  np.testing.assert_array_equal(ckpt.restore(state)[0]["w"], [0.0, 1.0, 2.0])
  ckpt.save(3, {"w": jnp.ones(3)}, {"epoch": 3, "data": {"a": [2]}})  # other meta: replaced
  restored, meta = ckpt.restore(state)
  np.testing.assert_array_equal(restored["w"], [1.0, 1.0, 1.0])
  assert meta["data"] == {"a": [2]}
  ckpt.save(1, state, {"epoch": 1})
  ckpt.save(5, state, {"epoch": 5})
  assert ckpt.epochs() == [1, 3, 5]
  ckpt.keep([3, None])
  assert ckpt.epochs() == [3]
  assert checkpoint.Checkpointer(tmp_path / "model").epochs() == [3]  # as found on disk


def _tree(root: pathlib.Path) -> pathlib.Path:
  return data_trees.noisy_mvtec_tree(root, n_train=6, test=(("good", 2), ("crack", 2)), size=(40, 40))


def _config(root: pathlib.Path, **changes):
  config = config_base.load(str(REPO / "configs" / "mvtec.py:smoke"))
  config = config_base.apply_overrides(config, OVERRIDES)
  config.dataset.root = str(root)
  config.dataset.data_dir = str(root.parent / "tfds")
  return config_base.apply_overrides(config, changes)


def _untimed(rows):
  return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _class_results(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "mvtec_bottle" / "results.json").read_text())


@pytest.fixture(name="straight", scope="module")
def _straight(tmp_path_factory):
  """An uninterrupted run: (data root, workdir, results)."""
  base = tmp_path_factory.mktemp("straight")
  root = _tree(base / "raw")
  results = experiment.train_and_evaluate(_config(root), str(base / "run"))
  return root, base / "run", results


def _crash_after(monkeypatch, owner, name, *, before=False, only=lambda *a, **k: True):
  """Makes `owner.name` raise Crash after (or `before`) a call for which `only(*args)` holds."""
  original = getattr(owner, name)

  def crashing(*args, **kwargs):
    if before and only(*args, **kwargs):
      raise Crash(name)
    out = original(*args, **kwargs)
    if only(*args, **kwargs):
      raise Crash(name)
    return out

  monkeypatch.setattr(owner, name, crashing)


def _is_model(checkpointer, *_):
  return os.path.basename(checkpointer.directory) == "model"


# Each stage after training, in the order the main job reaches them: the first run's model/ saved,
# its test set scored, its metrics computed, its heatmaps written, then the class results.
STAGES = {
    "model_saved": dict(owner=checkpoint.Checkpointer, name="save", only=_is_model),
    "scoring": dict(owner=inference, name="predict"),
    "metrics": dict(owner=metrics_lib, name="compute_all"),
    "heatmaps": dict(owner=heatmaps, name="save_heatmaps"),
    "results": dict(owner=report, name="write_results", before=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_rerun_after_a_crash_at_each_stage_finishes_with_the_same_results(
    tmp_path, monkeypatch, straight, stage):
  root, straight_dir, expected = straight
  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    _crash_after(patch, **STAGES[stage])
    with pytest.raises(Crash):
      experiment.train_and_evaluate(_config(root), str(workdir))
  assert not (workdir / "mvtec_bottle" / "results.json").exists()

  results = experiment.train_and_evaluate(_config(root), str(workdir))
  assert _untimed(results["rows"]) == _untimed(expected["rows"])
  assert _untimed(_class_results(workdir)["rows"]) == _untimed(expected["rows"])
  class_dir, straight_class = workdir / "mvtec_bottle", straight_dir / "mvtec_bottle"
  for run in ("seed0_k0.25", "seed1_k0.25"):
    assert checkpoint.Checkpointer(class_dir / run / "model").epochs() == [3]
    assert (sorted(p.name for p in (class_dir / run / "heatmaps").iterdir())
            == sorted(p.name for p in (straight_class / run / "heatmaps").iterdir()))
  assert ((class_dir / "metrics.jsonl").read_text()
          == (straight_class / "metrics.jsonl").read_text())


@pytest.mark.slow
def test_rerun_after_kill_9_once_the_model_is_saved(tmp_path, straight):
  """The issue's case: a real SIGKILL right after the first run's model/ is saved."""
  root, _, expected = straight
  workdir = tmp_path / "run"
  args = [f"--config={REPO / 'configs' / 'mvtec.py'}:smoke", f"--workdir={workdir}",
          f"--config.dataset.root={root}", f"--config.dataset.data_dir={root.parent / 'tfds'}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  script = (
      "import os, signal, sys\n"
      "from absl import app\n"
      "from pbas_jax import checkpoint, main\n"
      "save = checkpoint.Checkpointer.save\n"
      "def killing_save(self, *args):\n"
      "  save(self, *args)\n"
      "  if os.path.basename(self.directory) == 'model':\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      "checkpoint.Checkpointer.save = killing_save\n"
      f"sys.argv = ['main', *{args!r}]\n"
      "app.run(main.main)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert checkpoint.Checkpointer(workdir / "mvtec_bottle" / "seed0_k0.25" / "model").epochs() == [3]
  assert not (workdir / "mvtec_bottle" / "results.json").exists()

  results = experiment.train_and_evaluate(_config(root), str(workdir))
  assert _untimed(results["rows"]) == _untimed(expected["rows"])


def _monotone_evaluation(monkeypatch):
  """Test scores that grow with the epoch (the state's step), so that every later epoch is the
  best: the interrupted run saves best/ epochs after its last checkpoint, and the replay must
  save them again. The reported metrics are computed apart (`metrics.compute_all`)."""
  evaluate = inference.evaluate

  def monotone(state, *args, **kwargs):
    return {**evaluate(state, *args, **kwargs), "i_auroc": int(state.step) / 1000, "p_auroc": 0.0}

  monkeypatch.setattr(inference, "evaluate", monotone)


@pytest.mark.slow
def test_test_oracle_run_replayed_after_a_resume_finishes_with_the_same_results(
    tmp_path, monkeypatch):
  root = _tree(tmp_path / "raw")
  changes = {"train.epochs": 4, "train.checkpoint_every": 2, "eval.selection": "test_oracle",
             "eval.heatmaps": 0}
  _monotone_evaluation(monkeypatch)
  expected = experiment.train_and_evaluate(_config(root, **changes), str(tmp_path / "straight"))
  assert [row["epoch"] for row in expected["rows"]] == [4, 4]

  workdir = tmp_path / "run"
  class_dir = workdir / "mvtec_bottle"
  runs = ("seed0_k0.25", "seed1_k0.25")
  with monkeypatch.context() as patch:  # killed as it saves the checkpoint of epoch 4
    _crash_after(patch, checkpoint.Checkpointer, "save", before=True,
                 only=lambda c, epoch, *_: c.directory.endswith("checkpoints") and epoch == 4)
    with pytest.raises(Crash):
      experiment.train_and_evaluate(_config(root, **changes), str(workdir))
  assert checkpoint.Checkpointer(class_dir / "checkpoints").latest_epoch() == 2
  for run in runs:  # best/ saved epochs after that checkpoint, which the rerun replays
    assert checkpoint.Checkpointer(class_dir / run / "best").epochs() == [2, 3, 4]

  results = experiment.train_and_evaluate(_config(root, **changes), str(workdir))
  assert _untimed(results["rows"]) == _untimed(expected["rows"])
  for run in runs:
    assert checkpoint.Checkpointer(class_dir / run / "best").epochs() == [4]
    assert checkpoint.Checkpointer(class_dir / run / "model").epochs() == [4]
  lines = [json.loads(line) for line in (class_dir / "metrics.jsonl").open()]
  assert [(l["epoch"], l["run"]) for l in lines] == [(e, r) for e in range(1, 5) for r in (0, 1)]


def _change_a_training_image(root: pathlib.Path, seed: int):
  path = root / "bottle" / "train" / "good" / "000.png"
  data_trees.write_image(path, np.random.default_rng(seed).integers(0, 255, (40, 40, 3)))


@pytest.mark.slow
def test_changed_data_stops_a_resume_and_is_noted_for_a_finished_class(
    tmp_path, monkeypatch, straight):
  _, _, expected = straight
  root = _tree(tmp_path / "raw")
  workdir = tmp_path / "run"
  config = _config(root)
  with monkeypatch.context() as patch:  # trained, killed while scoring
    _crash_after(patch, inference, "predict")
    with pytest.raises(Crash):
      experiment.train_and_evaluate(config, str(workdir))
  _change_a_training_image(root, seed=1)
  with pytest.raises(experiment.DataChangedError) as err:
    experiment.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  assert "the class's source files" in message and "interrupted at epoch 3" in message
  assert f"delete {workdir / 'mvtec_bottle'}" in message and "--workdir" in message

  # As the error says: delete the class folder; it trains on the current data.
  shutil.rmtree(workdir / "mvtec_bottle")
  trained = experiment.train_and_evaluate(config, str(workdir))
  assert _untimed(trained["rows"]) != _untimed(expected["rows"])  # other data, other numbers
  assert not any("other data" in note for note in trained["notes"])

  # Finished, then the data changes: the results are read back, with a warning in the notes.
  _change_a_training_image(root, seed=2)
  again = experiment.train_and_evaluate(config, str(workdir))
  assert again["rows"] == trained["rows"]
  [note] = [note for note in again["notes"] if "other data" in note]
  assert note.startswith("bottle: its results") and "the class's source files" in note
  assert json.loads((workdir / "results.json").read_text())["notes"] == again["notes"]


def _poison_run_after_epoch(monkeypatch, run: int, epoch: int):
  """NaN parameters for `run` once `epoch` is trained: its next epoch's metrics are non-finite.
  (The checkpoint of `epoch` holds the NaN state too: the last good one is the one before.)"""
  train = engine.Trainer.train

  def poisoned(self, states, features, first_epoch, num_epochs):
    states, metrics = train(self, states, features, first_epoch, num_epochs)
    if first_epoch + num_epochs == epoch:
      states = states.replace(params=jax.tree.map(lambda x: x.at[run].set(jnp.nan),
                                                  states.params))
    return states, metrics

  monkeypatch.setattr(engine.Trainer, "train", poisoned)


def test_a_diverged_run_stops_alone_and_keeps_its_last_good_state(tmp_path, monkeypatch):
  """On the 8-device mesh, stopped after the divergence and resumed (the diverged run's last good
  state comes back from the checkpoint, placed as the states are)."""
  mesh, one_device = sharding.make_mesh(), sharding.make_mesh(jax.devices()[:1])
  features = _split(jnp.asarray(clustered(6, n=10)))
  runs = [engine.Run(0, 0.25), engine.Run(1, 0.25)]
  config = engine_config(num_runs=2, checkpoint_every=1)
  with monkeypatch.context() as patch:
    _poison_run_after_epoch(patch, run=1, epoch=2)
    config.train.epochs = 3  # stopped at epoch 3, where run 1 diverges
    experiment.train_runs(config, str(tmp_path / "together"), features, None, runs, mesh)
    config.train.epochs = 4
    together = experiment.train_runs(config, str(tmp_path / "together"), features, None, runs,
                                     mesh)
  (state, epoch), (diverged_state, diverged_epoch) = together
  assert epoch == 4 and (diverged_state, diverged_epoch) == (None, 3)
  [(alone, _)] = experiment.train_runs(engine_config(seed=0, checkpoint_every=1, epochs=4),
                                       str(tmp_path / "alone"), features, None, runs[:1],
                                       one_device)
  assert_states_close(state, alone)

  lines = [json.loads(l) for l in (tmp_path / "together" / "metrics.jsonl").open()]
  assert [(l["epoch"], l["run"]) for l in lines] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
                                                     (4, 0)]
  # The checkpoints keep the diverged run's last good state: its epoch-1 state.
  ckpts = checkpoint.Checkpointer(tmp_path / "together" / "checkpoints")
  template = engine.state_template(config, runs, features.features.shape)
  last, meta = ckpts.restore(template)
  assert meta["epoch"] == 4 and meta["diverged"] == [None, {"epoch": 3, "good_epoch": 1}]
  [(epoch1, _)] = experiment.train_runs(engine_config(seed=1, checkpoint_every=1, epochs=1),
                                        str(tmp_path / "alone1"), features, None, runs[1:],
                                        one_device)
  assert_states_close(engine.unstack(last)[1], epoch1)
  # The same call again (a rerun) reports the same from the checkpoints.
  again = experiment.train_runs(config, str(tmp_path / "together"), features, None, runs, mesh)
  assert again[1] == (None, 3)
  jax.tree.map(np.testing.assert_array_equal, again[0][0], state)


@pytest.mark.slow
def test_main_job_reports_a_diverged_run_and_the_others(tmp_path, monkeypatch, straight):
  root, _, expected = straight
  workdir = tmp_path / "run"
  _poison_run_after_epoch(monkeypatch, run=1, epoch=2)
  for attempt in range(2):  # the run, then a rerun of the finished class
    with pytest.raises(experiment.NonFiniteLossError, match="seed 1 alpha 0.25 at epoch 3"):
      experiment.train_and_evaluate(_config(root), str(workdir))
    results = json.loads((workdir / "results.json").read_text())
    good, bad = results["rows"]
    assert _untimed([good]) == _untimed(expected["rows"][:1])
    assert bad["diverged_epoch"] == 3 and bad["epoch"] is None
    assert all(bad[key] is None for key in report.METRIC_KEYS)
    assert any("seed1_k0.25: diverged at epoch 3" in note for note in results["notes"])
    assert "diverged_epoch" in (workdir / "results.csv").read_text()
  assert checkpoint.Checkpointer(workdir / "mvtec_bottle" / "seed1_k0.25" / "model").epochs() == []
  # Evaluation only: the other run again, the diverged one reported as such.
  with pytest.raises(experiment.NonFiniteLossError, match="seed 1 alpha 0.25 at epoch 3"):
    experiment.train_and_evaluate(_config(root, **{"eval.only": True}), str(workdir))
  evaluated = json.loads((workdir / "results.json").read_text())["rows"]
  assert _untimed(evaluated) == _untimed(results["rows"])
