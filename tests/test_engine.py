"""The training engine: R runs x epochs as one scanned program equals a plain loop over the pure
step; runs trained together equal runs alone; resumes are bit-identical; alpha is first-class."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_trees
from pbas_jax import checkpoint
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import experiment
from pbas_jax import feature_cache
from pbas_jax import sharding
from pbas_jax import train
from test_sharding import assert_states_close
from test_sharding import clustered
from test_sharding import small_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(name="one_device", scope="module")
def _one_device():
  return sharding.make_mesh(jax.devices()[:1])


def _split(features):
  n = len(features)
  return feature_cache.Split(features=features, labels=np.zeros(n, int), masks=None,
                             names=[str(i) for i in range(n)], defect_types=["good"] * n,
                             images=np.zeros((0, 32, 32, 3), np.float32))


def _config(seed=0, k=0.25, num_runs=1, **train_settings):
  config = small_config(k=k)
  config.dataset.batch_size = 8  # 10 images: steps of 8 (split over 8 devices on a mesh) and 2
  config.train.epochs = 2
  config.train.seed = seed
  config.train.num_runs = num_runs
  config.eval.heatmaps = 0
  for name, value in train_settings.items():
    setattr(config.train, name, value)
  return config


def _loop(config, run, features, epochs):
  """The reference's loop, written plainly: the pure step jitted alone, one Python call per batch,
  the same keys and orders as the engine derives (`engine.epoch_plan`)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = engine.unstack(engine.init_states(config, [run], jnp.asarray(features), mesh))[0]
  step = jax.jit(train.make_train_step(config))
  bs, history = config.dataset.batch_size, []
  for epoch in range(epochs):
    key = jax.random.fold_in(engine.run_keys(run.seed)[2], epoch)
    perm, step_keys = engine.epoch_plan(key, len(features), bs)
    steps = []
    for i, start in enumerate(range(0, len(features), bs)):
      state, metrics = step(state, features[np.asarray(perm[start:start + bs])], step_keys[i],
                            {"k": jnp.float32(run.k)})
      steps.append(metrics)
    history.append({name: float(np.mean([m[name] for m in steps])) for name in steps[0]})
  return state, history


def test_runs_of_config():
  config = _config(seed=5, num_runs=2)
  assert engine.runs_of(config) == [engine.Run(5, 0.25), engine.Run(6, 0.25)]
  config.train.k_values = (0.1, 0.5)
  assert engine.runs_of(config) == [engine.Run(5, 0.1), engine.Run(6, 0.1),
                                    engine.Run(5, 0.5), engine.Run(6, 0.5)]
  assert [run.name for run in engine.runs_of(config)[:2]] == ["seed5_k0.1", "seed6_k0.1"]
  config.train.k_values = (0.3,)  # one value: that alpha, not model.k
  assert engine.runs_of(config) == [engine.Run(5, 0.3), engine.Run(6, 0.3)]
  config.train.k_values = (0.1, 0.1)
  with pytest.raises(ValueError, match="train.k_values"):
    engine.runs_of(config)


def test_stack_unstack_roundtrip():
  trees = [{"a": jnp.full((2,), float(r)), "b": jnp.full((1, 3), 2.0 * r)} for r in range(3)]
  stacked = engine.stack(trees)
  assert stacked["a"].shape == (3, 2) and stacked["b"].shape == (3, 1, 3)
  for tree, back in zip(trees, engine.unstack(stacked), strict=True):
    jax.tree.map(np.testing.assert_array_equal, tree, back)


@pytest.mark.parametrize("batch_size", [4, 10, 16])  # partial last batch; one full; one partial
def test_scanned_epochs_equal_a_python_loop_over_the_pure_step(one_device, batch_size):
  config = _config(k=0.3)
  config.dataset.batch_size = batch_size
  features = clustered(0, n=10)
  run = engine.Run(3, 0.3)
  expected, history = _loop(config, run, features, epochs=3)
  trainer = engine.Trainer(config, [run], one_device)
  states = engine.init_states(config, [run], jnp.asarray(features), one_device)
  states, first = trainer.train(states, features, 0, 2)  # two epochs in one call
  states, last = trainer.train(states, features, 2, 1)  # then one more
  got = engine.unstack(states)[0]
  assert int(got.step) == int(expected.step) == 3 * -(-10 // batch_size)
  # Every parameter to 1e-6 except the discriminator's pre-BatchNorm bias, whose gradient is
  # exactly zero in exact arithmetic (see assert_states_close): Adam turns float noise into steps.
  assert_states_close(got, expected, rtol=1e-6, atol=1e-6)
  for epoch, metrics in enumerate(first + last):
    for name, value in history[epoch].items():
      np.testing.assert_allclose(metrics[0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("where", ["one_device", "mesh"])
def test_vmapped_runs_equal_runs_alone(tmp_path, where, one_device):
  """Different seeds and a different k, on one device or over the 8-device mesh."""
  mesh = one_device if where == "one_device" else sharding.make_mesh()
  features = jnp.asarray(clustered(0, n=10))
  runs = [engine.Run(0, 0.25), engine.Run(1, 0.25), engine.Run(0, 1.0)]
  together = experiment.train_runs(_config(num_runs=2), str(tmp_path / "together"),
                                   _split(features), None, runs, mesh)
  lines = [json.loads(line) for line in (tmp_path / "together" / "metrics.jsonl").open()]
  assert [(l["epoch"], l["run"], l["seed"], l["alpha"]) for l in lines] == [
      (e, r, run.seed, run.k) for e in (1, 2) for r, run in enumerate(runs)]
  for r, (run, (state, epoch)) in enumerate(zip(runs, together, strict=True)):
    [(alone, alone_epoch)] = experiment.train_runs(
        _config(seed=run.seed, k=run.k), str(tmp_path / f"alone{r}"), _split(features), None,
        [run], one_device)
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


def test_vmapped_runs_resume_where_they_stopped(tmp_path, one_device):
  features = _split(jnp.asarray(clustered(1, n=10)))
  runs = [engine.Run(0, 0.25), engine.Run(1, 0.5)]
  config = _config(num_runs=2, checkpoint_every=1)
  straight = experiment.train_runs(config, str(tmp_path / "straight"), features, None, runs,
                                   one_device)
  config.train.epochs = 1  # stopped after epoch 1, then the same command with 2 epochs
  experiment.train_runs(config, str(tmp_path / "resumed"), features, None, runs, one_device)
  config.train.epochs = 2
  resumed = experiment.train_runs(config, str(tmp_path / "resumed"), features, None, runs,
                                  one_device)
  for (a, epoch_a), (b, epoch_b) in zip(straight, resumed, strict=True):
    assert epoch_a == epoch_b == 2
    jax.tree.map(np.testing.assert_array_equal, a, b)
  epochs = [json.loads(l)["epoch"] for l in (tmp_path / "resumed" / "metrics.jsonl").open()]
  assert epochs == [1, 1, 2, 2]


def test_one_alpha_value_trains_with_that_alpha(tmp_path, one_device):
  features = _split(jnp.asarray(clustered(2, n=10)))
  config = _config(k=0.25)
  config.train.k_values = (0.3,)
  [run] = engine.runs_of(config)
  [(via_k_values, _)] = experiment.train_runs(config, str(tmp_path / "a"), features, None, [run],
                                              one_device)
  [(via_model_k, _)] = experiment.train_runs(_config(k=0.3), str(tmp_path / "b"), features,
                                             None, [engine.Run(0, 0.3)], one_device)
  [(default_k, _)] = experiment.train_runs(_config(k=0.25), str(tmp_path / "c"), features, None,
                                           [engine.Run(0, 0.25)], one_device)
  jax.tree.map(np.testing.assert_array_equal, via_k_values.params, via_model_k.params)
  assert not np.allclose(via_k_values.params["discriminator"]["tail"]["kernel"],
                         default_k.params["discriminator"]["tail"]["kernel"])
  assert {json.loads(l)["alpha"] for l in (tmp_path / "a" / "metrics.jsonl").open()} == {0.3}


def test_abl_alone_leaves_the_discriminator_untouched(one_device):
  config = _config()
  config.model.rbo, config.model.scoring = False, "center_distance"
  features = clustered(3, n=10)
  run = engine.Run(0, 0.25)
  states = engine.init_states(config, [run], jnp.asarray(features), one_device)
  before = jax.tree.map(np.asarray, engine.unstack(states)[0])
  states, history = engine.Trainer(config, [run], one_device).train(states, features, 0, 2)
  after = engine.unstack(states)[0]
  jax.tree.map(np.testing.assert_array_equal, before.params["discriminator"],
               after.params["discriminator"])
  jax.tree.map(np.testing.assert_array_equal, before.batch_stats, after.batch_stats)
  assert not np.allclose(before.params["projector"]["layer0"]["kernel"],
                         after.params["projector"]["layer0"]["kernel"])
  assert set(history[0][0]) == {"loss", "loss_c", "r", "grad_norm_projector"}


def test_bfloat16_compute_keeps_float32_parameters_and_stays_close(one_device):
  features = clustered(4, n=10)
  run = engine.Run(0, 0.25)
  trained = {}
  for dtype in ("float32", "bfloat16"):
    config = _config(compute_dtype=dtype)
    states = engine.init_states(config, [run], jnp.asarray(features), one_device)
    states, history = engine.Trainer(config, [run], one_device).train(states, features, 0, 2)
    trained[dtype] = (engine.unstack(states)[0], history[-1][0])
  f32, bf16 = trained["float32"][0], trained["bfloat16"][0]
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.float32)}
  kernel = lambda s: np.asarray(s.params["projector"]["layer0"]["kernel"])
  assert not np.array_equal(kernel(f32), kernel(bf16))  # the option really changes the maths
  np.testing.assert_allclose(kernel(bf16), kernel(f32), atol=2e-3)
  np.testing.assert_allclose(trained["bfloat16"][1]["loss"], trained["float32"][1]["loss"],
                             rtol=5e-2)


def test_parameter_averaging_is_a_per_step_ema_used_for_scoring(one_device):
  config = _config(param_ema=0.5)
  features = clustered(5, n=10)
  run = engine.Run(0, 0.25)
  start = engine.unstack(engine.init_states(config, [run], jnp.asarray(features), one_device))[0]
  jax.tree.map(np.testing.assert_array_equal, start.ema_params, start.params)
  step = jax.jit(train.make_train_step(config))
  one, _ = step(start, features[:8], jax.random.key(0))
  jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.5 * a + 0.5 * b, rtol=1e-6),
               one.ema_params, start.params, one.params)
  averaged = train.score_patches(one, features[:2])
  np.testing.assert_array_equal(
      averaged, train.score_patches(one.replace(params=one.ema_params, ema_params=None),
                                    features[:2]))
  assert not np.allclose(averaged, train.score_patches(one.replace(ema_params=None),
                                                       features[:2]))
  off = engine.unstack(engine.init_states(_config(), [run], jnp.asarray(features), one_device))[0]
  assert off.ema_params is None  # off by default: nothing extra in the state


def test_subsampled_runs_each_draw_their_own_images_as_if_alone(tmp_path, one_device):
  """dataset.subsample < 1: run r of R (here 2 runs on a 2x4 mesh) trains on its own seed's
  subset, equal to that seed trained alone, equal to training on only those images' features."""
  features = clustered(6, n=12)
  config = _config(num_runs=2)
  config.dataset.subsample = 0.5
  runs = engine.runs_of(config)
  subsets = engine.image_subsets(config, runs, 12)
  assert subsets.shape == (2, 6) and not np.array_equal(subsets[0], subsets[1])
  for run, subset in zip(runs, subsets, strict=True):
    np.testing.assert_array_equal(subset, data.subsample_indices(12, 0.5, run.seed))
  mesh = engine.mesh_of(config)
  assert mesh.shape == {"runs": 2, "data": 4}
  together = experiment.train_runs(config, str(tmp_path / "together"), _split(features), None,
                                   runs, mesh)
  for r, (run, (state, _)) in enumerate(zip(runs, together, strict=True)):
    alone_config = _config(seed=run.seed)
    alone_config.dataset.subsample = 0.5
    [(alone, _)] = experiment.train_runs(alone_config, str(tmp_path / f"alone{r}"),
                                         _split(features), None, [run], one_device)
    assert_states_close(state, alone)
    [(chosen, _)] = experiment.train_runs(_config(seed=run.seed), str(tmp_path / f"chosen{r}"),
                                          _split(features[subsets[r]]), None, [run], one_device)
    assert_states_close(alone, chosen)
  [(full, _)] = experiment.train_runs(_config(), str(tmp_path / "full"), _split(features), None,
                                      runs[:1], one_device)
  assert not np.allclose(full.center, together[0][0].center)  # the subsample really applies


def test_progress_reports_each_epoch_from_inside_a_call():
  """The on_epoch hook sees every epoch of a 3-epoch call as it finishes, with the metrics the
  call returns (2 runs on the 8-device mesh)."""
  config = _config(num_runs=2)
  features = clustered(7, n=10)
  runs = engine.runs_of(config)
  mesh = engine.mesh_of(config)
  calls = []
  trainer = engine.Trainer(config, runs, mesh,
                           on_epoch=lambda epoch, m: calls.append((epoch, dict(m))))
  states = engine.init_states(config, runs, features, mesh)
  _, history = trainer.train(states, features, 2, 3)
  assert [epoch for epoch, _ in calls] == [3, 4, 5]
  for (_, reported), per_run in zip(calls, history, strict=True):
    assert reported.keys() == per_run[0].keys()
    for name, values in reported.items():
      assert values.shape == (2,)
      np.testing.assert_array_equal(values, np.float32([m[name] for m in per_run]))


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
  template = engine.unstack(engine.state_template(config, engine.runs_of(config)[:1],
                                                  (32 // 8, 32 // 8, 64)))[0]
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
