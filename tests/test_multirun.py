"""R runs trained together (vmapped) equal the R runs alone; the main job reports each."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_trees
from pbas_jax import checkpoint
from pbas_jax import config_base
from pbas_jax import experiment
from pbas_jax import multirun
from pbas_jax import sharding
from test_sharding import assert_states_close
from test_sharding import clustered
from test_sharding import small_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _split(features):
  n = len(features)
  return experiment.Split(features=features, labels=np.zeros(n, int), masks=None,
                          names=[str(i) for i in range(n)], defect_types=["good"] * n,
                          images=np.zeros((0, 32, 32, 3), np.float32))


def _config(seed=0, k=0.25, num_runs=1):
  config = small_config(k=k)
  config.dataset.batch_size = 8  # 10 images: steps of 8 (split over 8 devices on a mesh) and 2
  config.train.epochs = 2
  config.train.seed = seed
  config.train.num_runs = num_runs
  config.eval.heatmaps = 0
  return config


def test_runs_of_config():
  config = _config(seed=5, num_runs=2)
  assert multirun.runs_of(config) == [multirun.Run(5, 0.25), multirun.Run(6, 0.25)]
  config.train.k_values = (0.1, 0.5)
  assert multirun.runs_of(config) == [multirun.Run(5, 0.1), multirun.Run(6, 0.1),
                                      multirun.Run(5, 0.5), multirun.Run(6, 0.5)]
  assert [run.name for run in multirun.runs_of(config)[:2]] == ["seed5_k0.1", "seed6_k0.1"]
  config.train.k_values = (0.1, 0.1)
  with pytest.raises(ValueError, match="train.k_values"):
    multirun.runs_of(config)


def test_stack_unstack_roundtrip():
  trees = [{"a": jnp.full((2,), float(r)), "b": jnp.full((1, 3), 2.0 * r)} for r in range(3)]
  stacked = multirun.stack(trees)
  assert stacked["a"].shape == (3, 2) and stacked["b"].shape == (3, 1, 3)
  for tree, back in zip(trees, multirun.unstack(stacked), strict=True):
    jax.tree.map(np.testing.assert_array_equal, tree, back)


@pytest.mark.parametrize("where", ["device", "host", "mesh"])
def test_vmapped_runs_equal_runs_alone(tmp_path, where):
  """Different seeds and a different k, on device / host features, or over the 8-device mesh."""
  features = clustered(0, n=10)
  runs = [multirun.Run(0, 0.25), multirun.Run(1, 0.25), multirun.Run(0, 1.0)]
  mesh = sharding.make_mesh() if where == "mesh" else None
  cache = features if where == "host" else jnp.asarray(features)
  together = experiment.train_runs(_config(num_runs=2), str(tmp_path / "together"),
                                   _split(cache), None, runs, mesh)
  lines = [json.loads(line) for line in (tmp_path / "together" / "metrics.jsonl").open()]
  assert [(l["epoch"], l["run"], l["seed"], l["alpha"]) for l in lines] == [
      (e, r, run.seed, run.k) for e in (1, 2) for r, run in enumerate(runs)]
  for r, (run, (state, epoch)) in enumerate(zip(runs, together, strict=True)):
    alone, alone_epoch = experiment.train_class(
        _config(seed=run.seed, k=run.k), str(tmp_path / f"alone{r}"),
        _split(jnp.asarray(features)), None)
    assert epoch == alone_epoch == 2
    assert int(state.step) == 2 * 2
    assert_states_close(state, alone)
    alone_lines = [json.loads(l) for l in (tmp_path / f"alone{r}" / "metrics.jsonl").open()]
    for line, alone_line in zip([l for l in lines if l["run"] == r], alone_lines, strict=True):
      np.testing.assert_allclose(line["loss"], alone_line["loss"], rtol=1e-5)
  # Different seeds and k really make different runs.
  assert not np.allclose(together[0][0].center, together[1][0].center)
  assert not np.allclose(together[0][0].params["projector"]["layer0"]["kernel"],
                         together[2][0].params["projector"]["layer0"]["kernel"])


def test_vmapped_runs_resume_where_they_stopped(tmp_path):
  features = _split(jnp.asarray(clustered(1, n=10)))
  runs = [multirun.Run(0, 0.25), multirun.Run(1, 0.5)]
  config = _config(num_runs=2)
  config.train.checkpoint_every = 1
  straight = experiment.train_runs(config, str(tmp_path / "straight"), features, None, runs)
  config.train.epochs = 1  # stopped after epoch 1, then the same command with 2 epochs
  experiment.train_runs(config, str(tmp_path / "resumed"), features, None, runs)
  config.train.epochs = 2
  resumed = experiment.train_runs(config, str(tmp_path / "resumed"), features, None, runs)
  for (a, epoch_a), (b, epoch_b) in zip(straight, resumed, strict=True):
    assert epoch_a == epoch_b == 2
    jax.tree.map(np.testing.assert_array_equal, a, b)
  epochs = [json.loads(l)["epoch"] for l in (tmp_path / "resumed" / "metrics.jsonl").open()]
  assert epochs == [1, 1, 2, 2]


@pytest.mark.slow
def test_main_job_reports_every_run_and_skips_them_when_finished(tmp_path):
  root = tmp_path / "raw"
  data_trees.mvtec_tree(root, "bottle", n_train=6, test=(("good", 2), ("crack", 2)), size=(40, 40))
  rng = np.random.default_rng(0)
  for path in sorted(root.glob("bottle/*/*/*.png")):
    if "ground_truth" not in path.parts:
      data_trees.write_image(path, rng.integers(0, 255, (40, 40, 3)))
  config = config_base.load(str(REPO / "configs" / "mvtec.py:smoke"))
  config.backbone.name = "resnet18"
  config.backbone.pretrain_dim = config.backbone.target_dim = 64
  config.model.disc_hidden = 32
  config.dataset.image_size = config.dataset.resize = 32
  config.dataset.root, config.dataset.classes = str(root), "bottle"
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.dataset.batch_size = 4  # 6 training images: steps of 4 and 2
  config.train.epochs, config.train.num_runs, config.train.seed = 2, 2, 3
  config.eval.selection = "test_oracle"  # each run keeps its own best epoch
  config.eval.heatmaps = 1
  workdir = tmp_path / "run"
  results = experiment.train_and_evaluate(config, str(workdir))

  rows = results["rows"]
  assert [(r["seed"], r["run"], r["alpha"]) for r in rows] == [(3, 0, 0.25), (4, 1, 0.25)]
  class_dir = workdir / "mvtec_bottle"
  lines = [json.loads(line) for line in (class_dir / "metrics.jsonl").open()]
  assert [(l["epoch"], l["seed"]) for l in lines] == [(1, 3), (1, 4), (2, 3), (2, 4)]
  template = experiment.state_template(config, (32 // 8, 32 // 8, 64))
  centers = []
  for row, run, lines_of_run in zip(rows, ("seed3_k0.25", "seed4_k0.25"),
                                    (lines[0::2], lines[1::2])):
    assert len(list((class_dir / run / "heatmaps").glob("*.png"))) == 1
    state, meta = checkpoint.Checkpointer(class_dir / run / "model").restore(template)
    best = max(lines_of_run, key=lambda l: l["test_i_auroc"] + l["test_p_auroc"])
    assert meta["epoch"] == row["epoch"] == best["epoch"]
    assert int(state.step) == 2 * meta["epoch"]
    assert row["i_auroc"] == pytest.approx(best["test_i_auroc"], abs=1e-6)
    centers.append(state.center)
  assert not np.allclose(centers[0], centers[1])
  assert json.loads((class_dir / "results.json").read_text())["rows"] == rows

  again = experiment.train_and_evaluate(config, str(workdir))
  assert again["rows"] == rows
