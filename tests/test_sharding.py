"""Data parallelism over the 8 forced host devices equals one device, for any batch size."""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_trees
from pbas_jax import backbones
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import features as features_lib
from pbas_jax import inference
from pbas_jax import memory
from pbas_jax import metrics as metrics_lib
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PRE_BN_BIAS = ("params", "discriminator", "block0_linear", "bias")
RUNNING_MEAN = ("batch_stats", "discriminator", "block0_bn", "mean")


@pytest.fixture(name="mesh", scope="module")
def _mesh():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  return sharding.make_mesh()


def small_config(**model):
  config = config_base.base_config()
  config.model.disc_hidden = 32
  config_base.apply_overrides(config.model, model)
  return config


def clustered(seed, n, grid=4, dim=32):
  """Normal features `(n, grid, grid, dim)`: one prototype per position plus noise."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(grid, grid, dim)) + 0.3 * rng.normal(size=(n, grid, grid, dim))
          ).astype(np.float32)


def assert_states_close(a: train.TrainState, b: train.TrainState, rtol=1e-5, atol=1e-6):
  """Train states equal to float tolerance.

  The discriminator's pre-BatchNorm bias has an exactly zero gradient (BatchNorm removes it), so
  it moves by Adam-normalized float noise that differs with the summation order: it is not
  compared, and the running mean, which follows it, is compared to within its difference.
  """
  flat_a = {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(
      {"params": a.params, "batch_stats": a.batch_stats})}
  flat_b = {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(
      {"params": b.params, "batch_stats": b.batch_stats})}
  assert flat_a.keys() == flat_b.keys()
  bias_gap = float(np.abs(np.asarray(flat_a[PRE_BN_BIAS]) - np.asarray(flat_b[PRE_BN_BIAS])).max())
  assert bias_gap < 1e-2, bias_gap  # noise-sized steps of at most ~dsc_lr each
  for path in flat_a:
    if path == PRE_BN_BIAS:
      continue
    tol = atol + bias_gap if path == RUNNING_MEAN else atol
    np.testing.assert_allclose(flat_a[path], flat_b[path], rtol=rtol, atol=tol, err_msg=str(path))
  np.testing.assert_allclose(a.center, b.center, rtol=rtol, atol=atol)
  assert int(a.step) == int(b.step)


def initial_state(config, features, mesh=None, seed=0):
  """Run `seed`'s starting state (unstacked) built on `mesh` (default: one device)."""
  mesh = mesh or sharding.make_mesh(jax.devices()[:1])
  states = engine.init_states(config, [engine.Run(seed, config.model.k)], jnp.asarray(features),
                              mesh)
  return engine.unstack(states)[0]


def test_layouts(mesh):
  assert mesh.shape == {"runs": 1, "data": 8}
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("runs", "data"))
  assert sharding.batch_sharding(mesh, axis=1).spec == jax.sharding.PartitionSpec(
      None, ("runs", "data"))
  x = np.arange(30, dtype=np.float32).reshape(10, 3)
  padded = sharding.pad_rows(x, 8)
  assert padded.shape == (16, 3)
  np.testing.assert_array_equal(padded[:10], x)
  assert not padded[10:].any()
  assert sharding.pad_rows(jnp.asarray(x[:8]), 8).shape == (8, 3)


def test_mesh_shape_rule_and_settings():
  auto = {(r, d): sharding.mesh_shape("auto", r, d) for r in (1, 2, 3, 8, 12) for d in (1, 8)}
  assert auto == {(1, 1): (1, 1), (2, 1): (1, 1), (3, 1): (1, 1), (8, 1): (1, 1), (12, 1): (1, 1),
                  (1, 8): (1, 8), (2, 8): (2, 4), (3, 8): (1, 8), (8, 8): (8, 1), (12, 8): (4, 2)}
  assert sharding.mesh_shape("2x4", 6, 8) == (2, 4)
  with pytest.raises(ValueError, match="train.mesh='2x2' needs 4 devices, there are 8"):
    sharding.mesh_shape("2x2", 2, 8)
  with pytest.raises(ValueError, match="does not divide the 3 run"):
    sharding.mesh_shape("2x4", 3, 8)
  with pytest.raises(ValueError, match="'auto' or 'RxD'"):
    sharding.mesh_shape("2by4", 2, 8)
  config = small_config()
  config.dataset.root = "/data"
  config.train.mesh = "four"
  with pytest.raises(ValueError, match="train.mesh"):
    config_base.validate(config)
  config.train.mesh, config.train.num_runs = "4x2", 2
  with pytest.raises(ValueError, match="does not divide the 2 run"):
    config_base.validate(config)


def test_mesh_of_config_places_runs_by_the_rule():
  config = small_config()
  config.train.num_runs = 2
  assert engine.mesh_of(config).shape == {"runs": 2, "data": 4}
  config.train.mesh = "1x8"
  assert engine.mesh_of(config).shape == {"runs": 1, "data": 8}


_ONE_DEVICE = {}


def _trained(config, runs, mesh, features, epochs=2):
  states = engine.init_states(config, runs, features, mesh)
  return engine.Trainer(config, runs, mesh).train(states, features, 0, epochs)


@pytest.mark.parametrize("num_runs,layout,batch_size", [
    (8, "1x8", 8),  # 10 images: a step of 8 split over the data devices, then a step of 2 whole
    (8, "2x4", 8),
    (8, "4x2", 8),
    (8, "8x1", 8),  # one run per device
    (2, "1x8", 8),
    (2, "2x4", 8),
    (2, "2x4", 6),  # steps of 6 and 4 images, 4 data devices: the 6 whole, the 4 split
])
def test_mesh_layouts_equal_one_device(num_runs, layout, batch_size):
  config = small_config()
  config.dataset.batch_size = batch_size
  features = clustered(0, n=10)  # rows padded to a multiple of the data devices
  runs = [engine.Run(r // 2, 0.25 + 0.25 * (r % 2)) for r in range(num_runs)]
  key = (num_runs, batch_size)
  if key not in _ONE_DEVICE:
    _ONE_DEVICE[key] = _trained(config, runs, sharding.make_mesh(jax.devices()[:1]), features)
  single, m_single = _ONE_DEVICE[key]
  mesh = sharding.make_mesh(runs=sharding.mesh_shape(layout, num_runs, 8)[0])
  assert "x".join(map(str, mesh.devices.shape)) == layout
  sharded, m_sharded = _trained(config, runs, mesh, features)
  for epoch_single, epoch_sharded in zip(m_single, m_sharded, strict=True):
    for run_single, run_sharded in zip(epoch_single, epoch_sharded, strict=True):
      for name in run_single:
        np.testing.assert_allclose(run_sharded[name], run_single[name], rtol=1e-5, atol=1e-6)
  assert sharded.params["projector"]["layer0"]["kernel"].sharding == sharding.run_sharding(mesh)
  for a, b in zip(engine.unstack(sharded), engine.unstack(single), strict=True):
    assert_states_close(a, b)


def test_memory_plan_that_cannot_fit_stops_naming_the_settings_that_help(monkeypatch):
  config = small_config()
  mesh = sharding.make_mesh()
  plan = memory.check(config, 10, (4, 4, 32), mesh, "part")  # CPU: no limit reported, no stop
  assert plan["bytes_limit"] is None and plan["total"] > plan["features_per_device"] > 0
  monkeypatch.setattr(memory, "device_limit", lambda mesh: plan["total"] - 1)
  with pytest.raises(MemoryError, match=r"part: .*train.cache_dtype=bfloat16.*more devices.*"
                                        r"dataset.image_size"):
    memory.check(config, 10, (4, 4, 32), mesh, "part")
  monkeypatch.setattr(memory, "device_limit", lambda mesh: plan["total"])
  memory.check(config, 10, (4, 4, 32), mesh, "part")


COLLECTIVES = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast)(-start)?\(")


@pytest.mark.parametrize("progress", [False, True])
def test_run_per_device_mesh_has_no_collective_in_the_step(progress):
  """8 runs on 8 devices (8x1): every run's steps stay on its device. With the progress callback,
  the only collective is the gather of the epoch's (R,) metrics for the host."""
  config = small_config()
  config.dataset.batch_size = 8
  features = clustered(1, n=10)
  runs = [engine.Run(r, 0.25) for r in range(8)]
  compiled = {}
  for layout in ("8x1", "1x8"):
    mesh = sharding.make_mesh(runs=sharding.mesh_shape(layout, 8, 8)[0])
    trainer = engine.Trainer(config, runs, mesh,
                             on_epoch=(lambda epoch, metrics: None) if progress else None)
    trainer.train(engine.init_states(config, runs, features, mesh), features, 0, 1)
    compiled[layout] = trainer.compiled(1).as_text()
  found = {layout: {m[0] for m in COLLECTIVES.findall(text)} for layout, text in compiled.items()}
  assert "all-reduce" in found["1x8"]  # batches split over 8 devices: batch means all-reduced
  assert found["8x1"] == ({"all-gather"} if progress else set()), found["8x1"]
  if progress:
    gathers = [line for line in compiled["8x1"].splitlines()
               if COLLECTIVES.search(line) and "=" in line]
    assert all(re.search(r"= f32\[8\]", line) for line in gathers), gathers


def test_per_device_bytes_of_features_split_over_data_devices():
  """Per-device bytes of the cached features: N / data rows each (10 rows padded to 12 on a
  2x4 mesh: 3 rows per device), what the memory plan counts; the batch gathered from them equals
  indexing the whole array."""
  features = clustered(2, n=10)
  mesh = sharding.make_mesh(runs=2)
  for source in (features, jnp.asarray(features)):
    placed = sharding.put_rows(source, mesh)
    row_bytes = features[0].nbytes
    assert placed.shape == (12, *features.shape[1:])
    assert {shard.data.nbytes for shard in placed.addressable_shards} == {3 * row_bytes}
    assert len(placed.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(placed)[:10], features)
    assert not np.asarray(placed)[10:].any()
  config = small_config()
  config.train.num_runs = 2
  plan = memory.plan(config, n_images=10, feature_shape=features.shape[1:], mesh=mesh)
  assert plan["features_per_device"] == 3 * row_bytes
  one = memory.plan(config, n_images=10, feature_shape=features.shape[1:],
                    mesh=sharding.make_mesh(jax.devices()[:1]))
  assert one["features_per_device"] == 10 * row_bytes
  assert one["state_per_device"] == 2 * plan["state_per_device"]  # 2 runs vs 1 per device
  config.train.cache_dtype = "bfloat16"
  assert memory.plan(config, 10, features.shape[1:], mesh)["features_per_device"] == (
      3 * row_bytes // 2)
  idx = jnp.asarray([9, 0, 4, 4, 7, 1, 2, 3], jnp.int32)
  for size in (8, 6):  # split over the 4 data devices, and whole
    batch = jax.jit(lambda f, i: sharding.gather_rows(f, i, mesh))(placed, idx[:size])
    np.testing.assert_array_equal(np.asarray(batch), features[np.asarray(idx[:size])])


def test_sharded_inference_equals_one_device(mesh):
  config = small_config()
  config.dataset.image_size = 32
  config.eval.batch_size = 8  # 10 test images: a batch of 8 on 8 devices, then 2 padded to 8
  features = clustered(1, n=10)
  state = initial_state(config, features)
  state, _ = jax.jit(train.make_train_step(config))(state, features[:8], jax.random.key(0))
  features = jnp.asarray(features)
  scores, maps = inference.predict(state, features, config,
                                   sharding.make_mesh(jax.devices()[:1]))
  scores_8, maps_8 = inference.predict(state, features, config, mesh)
  assert scores_8.shape == (10,) and maps_8.shape == (10, 32, 32)
  np.testing.assert_allclose(scores_8, scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps_8, maps, rtol=1e-5, atol=1e-6)
  config.eval.batch_size = 6  # batches of 6 and 4, each padded to 8
  scores_6, maps_6 = inference.predict(state, features, config, mesh)
  np.testing.assert_allclose(scores_6, scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps_6, maps, rtol=1e-5, atol=1e-6)


def test_per_example_outputs_keep_their_rows(mesh):
  double = sharding.jit_per_example(lambda w, x: (x * w, x.sum(axis=1)), mesh)
  x = np.arange(30, dtype=np.float32).reshape(10, 3)
  scaled, sums = double(np.float32(2), x)
  assert scaled.shape == (10, 3) and sums.shape == (10,)
  np.testing.assert_array_equal(scaled, 2 * x)
  np.testing.assert_array_equal(sums, x.sum(axis=1))
  scaled, _ = double(np.float32(2), x[:8])
  assert scaled.sharding == sharding.batch_sharding(mesh)  # divisible: split, nothing dropped


def test_sharded_feature_extraction_equals_one_device(mesh):
  variables = backbones.load_variables("resnet18", "random", seed=0)
  args = ("resnet18", variables, ("layer2", "layer3"), 3, 64, 64)
  images = np.random.default_rng(2).normal(size=(10, 32, 32, 3)).astype(np.float32)
  single = features_lib.make_extractor(*args, mesh=sharding.make_mesh(jax.devices()[:1]))(images)
  sharded = features_lib.make_extractor(*args, mesh=mesh)(images)  # 10 rows padded to 16
  assert sharded.shape == single.shape == (10, 4, 4, 64)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["batch", "replicated"])
def test_global_batch_from_process_rows_equals_device_put(mesh, layout):
  target = sharding.batch_sharding(mesh) if layout == "batch" else sharding.replicated(mesh)
  x = np.random.default_rng(3).normal(size=(16, 4, 2)).astype(np.float32)
  rows = sharding.process_rows(target, x.shape)
  assert rows == slice(0, 16)  # one process holds every row
  built = sharding.global_batch(x[rows], target, global_rows=16)
  plain = jax.device_put(x, target)
  assert built.sharding == plain.sharding == target
  for a, b in zip(built.addressable_shards, plain.addressable_shards, strict=True):
    assert a.device == b.device and a.index == b.index
    np.testing.assert_array_equal(a.data, b.data)
  np.testing.assert_array_equal(sharding.to_host(built), x)
  np.testing.assert_array_equal(sharding.to_host(sharding.put(x, target)), x)


def test_initialize_distributed_only_under_multi_task_srun(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in ("SLURM_STEP_NUM_TASKS", "CUDA_VISIBLE_DEVICES"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "4")  # an sbatch script: one process, no step yet
  assert not sharding.initialize_distributed()
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
  assert not sharding.initialize_distributed()
  assert calls == []
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun -n 4: JAX picks GPU SLURM_LOCALID
  assert sharding.initialize_distributed()
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # srun --gpus-per-task=1: its only GPU
  assert sharding.initialize_distributed()
  assert calls == [{"local_device_ids": None}, {"local_device_ids": [0]}]


_TWO_PROCESSES = r"""
# The main job (`pbas_jax.main`), recording the images it decodes and the files it opens for writing.
import atexit, json, os, sys
from absl import app
import numpy as np
from pbas_jax import main  # must not start a JAX backend: main() joins the processes first
from pbas_jax import metrics
from pbas_jax.data import loader

record_path, sys.argv[1:] = sys.argv[1], sys.argv[2:]
decoded, written, recording = [], [], [True]
decode = loader.Source.decode

def counting_decode(self, record, index):
  decoded.append([self.split, int(index)])
  return decode(self, record, index)

def audit(event, args):
  if not recording[0] or event not in ("open", "os.rename", "os.replace"):
    return
  if event == "open":
    path, mode, flags = args
    if isinstance(path, int) or not (set(mode or "") & set("wax+")
                                     or flags & (os.O_WRONLY | os.O_RDWR)):
      return
  else:
    path = args[1]
  written.append(os.path.abspath(os.fsdecode(path)))

def save():
  recording[0] = False
  with open(record_path, "w") as f:
    json.dump({"decoded": decoded, "written": written}, f)

# The arrays every metric was computed from (scores, labels, maps, masks of each evaluation).
evaluated, compute_all = [], metrics.compute_all

def recording_compute_all(*args, **kwargs):
  evaluated.append([None if a is None else np.asarray(a) for a in args[:4]])
  return compute_all(*args, **kwargs)

def save_arrays():
  arrays = {f"{name}{i}": a for i, call in enumerate(evaluated)
            for name, a in zip(("scores", "labels", "maps", "masks"), call) if a is not None}
  np.savez(record_path + ".npz", calls=len(evaluated), **arrays)

loader.Source.decode = counting_decode
metrics.compute_all = recording_compute_all
sys.addaudithook(audit)
atexit.register(save_arrays)  # atexit runs last-in first-out: after save() stops recording
atexit.register(save)
app.run(main.main)
"""


@pytest.mark.slow
def test_two_processes_equal_one_device(tmp_path):
  """The main job in two JAX processes (2 host devices each) joined on localhost as under `srun`:
  the results of one process with 4 devices; each process decoded only its own rows of every
  batch; only process 0 wrote results, curves and heatmaps."""
  root = data_trees.nonsquare_tree(tmp_path / "raw", "part")  # 6 train, 6 test images
  data.prepare("folder", str(root), "part", data_dir=str(tmp_path / "tfds"))  # once, up front
  script = tmp_path / "main_job.py"
  script.write_text(_TWO_PROCESSES)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  flags = ["--config=configs/folder.py:smoke", f"--config.dataset.root={root}",
           f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.classes=part",
           "--config.backbone.name=resnet18", "--config.backbone.layers=('layer2','layer3')",
           "--config.backbone.pretrain_dim=64", "--config.backbone.target_dim=64",
           "--config.dataset.image_size=32", "--config.dataset.resize=32",
           "--config.model.disc_hidden=32", "--config.train.epochs=2",
           # ABL alone, scored by the distance to the nearest center: with the discriminator,
           # the evaluation's scores are not defined to float32 rounding. Its pre-BatchNorm bias
           # has a true gradient of 0, so Adam turns the float noise of its gradient into steps of
           # about lr, which the BatchNorm running mean follows only in part: a 1e-7 change of
           # the features (another summation order of the all-reduces, in-process vs gloo) moves
           # the scores by 1e-4. test_sharded_train_epochs_equal_one_device checks that path.
           "--config.model.rbo=False", "--config.model.scoring=center_distance",
           # Training batches of 4: 2 rows per process. Extraction batches of 3, padded to 4:
           # rows 0-1 on process 0, row 2 and a padding row on process 1.
           "--config.dataset.batch_size=4", "--config.eval.batch_size=3",
           "--config.eval.heatmaps=2", "--config.train.feature_cache=off"]
  base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
          and k != "CUDA_VISIBLE_DEVICES"}
  base.update(PBAS_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_STEP_NUM_TASKS="2", JAX_COORDINATOR_PORT=str(port),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
  jobs = {"one": dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4")}
  for i in range(2):
    jobs[f"process{i}"] = dict(base, **slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
  procs = {}
  for name, env in jobs.items():
    workdir = tmp_path / ("one" if name == "one" else "two")  # the processes share theirs
    with open(tmp_path / f"{name}.log", "w") as log:
      procs[name] = subprocess.Popen(
          [sys.executable, str(script), str(tmp_path / f"{name}.json"), *flags,
           f"--workdir={workdir}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    for p in procs.values():
      p.wait(timeout=1200)
  finally:
    for p in procs.values():
      p.kill()
  for name, p in procs.items():
    assert p.returncode == 0, f"{name}: " + (tmp_path / f"{name}.log").read_text()[-4000:]

  def assert_same(a: dict, b: dict, what: str):
    """Equal rows except timings and metrics (checked through the arrays they come from, below);
    float values to the float32 rounding of the sums that the two runs reduce in another order
    (in-process vs gloo all-reduces)."""
    assert a.keys() == b.keys(), what
    for key in a.keys() - {"wall_time_s", "images_per_s", *report.METRIC_KEYS,
                           *(f"test_{k}" for k in report.METRIC_KEYS)}:
      if isinstance(a[key], float):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"{what} {key}")
      else:
        assert b[key] == a[key], (what, key)

  one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
  assert one.keys() == two.keys() and one["notes"] == two["notes"]
  for table in ("rows", "means"):
    assert len(one[table]) == len(two[table]) == 1
    assert_same(one[table][0], two[table][0], table)
  assert one["rows"][0]["i_auroc"] is not None and one["rows"][0]["p_pro"] is not None
  curves = [[json.loads(line) for line in (tmp_path / d / "folder_part" / "metrics.jsonl")
             .read_text().splitlines()] for d in ("one", "two")]
  assert len(curves[0]) == len(curves[1]) == 2  # epochs
  for a, b in zip(*curves):
    assert_same(a, b, f"metrics.jsonl epoch {a['epoch']}")

  # Metrics are step functions of the scores: a float-rounding move of a pixel score can swap two
  # near-tied pixels and move P-AP by 1e-3. So the arrays are compared to float32 rounding, and
  # each side's reported metrics must be exactly those of its own arrays.
  arrays = {name: np.load(tmp_path / f"{name}.json.npz") for name in ("one", "process0")}
  assert int(arrays["one"]["calls"]) == int(arrays["process0"]["calls"]) == 1  # the final one
  a, b = arrays["one"], arrays["process0"]
  assert a["maps0"].shape == (6, 32, 32) and a["masks0"].shape == (6, 32, 32)
  np.testing.assert_array_equal(b["labels0"], a["labels0"])
  np.testing.assert_array_equal(b["masks0"], a["masks0"])
  for name in ("scores0", "maps0"):  # center distances; sums of a few hundred float32 terms
    np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5 * np.abs(a[name]).max(),
                               err_msg=name)
  for side, results in (("one", one), ("process0", two)):
    x = arrays[side]
    expected = metrics_lib.compute_all(x["scores0"], x["labels0"], x["maps0"], x["masks0"],
                                       results["rows"][0]["pro_variant"])
    for key in report.METRIC_KEYS:
      for table in ("rows", "means"):
        np.testing.assert_allclose(results[table][0][key], expected[key], rtol=1e-12,
                                   err_msg=f"{side} {table} {key}")

  records = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}
  workdir = str(tmp_path / "two")
  outputs = {i: sorted(os.path.relpath(path, workdir)
                       for path in records[f"process{i}"]["written"]
                       if path.startswith(workdir + os.sep))
             for i in range(2)}
  orbax = {"checkpoints", "model", "best"}  # every process takes part in orbax's saves
  assert [p for p in outputs[1] if not orbax & set(p.split(os.sep))] == [], outputs[1]
  for name in ("config.json", "results.json", "folder_part/results.json",
               "folder_part/metrics.jsonl"):
    assert name in outputs[0], (name, outputs[0])
  heatmaps = {p for p in outputs[0] if p.startswith("folder_part/heatmaps/")
              and not os.path.basename(p).startswith(".")}  # not the temporary files
  assert len(heatmaps) == 2 and all(p.endswith(".png") for p in heatmaps), heatmaps
  own = {0: [0, 1, 3, 4], 1: [2, 5]}  # their rows of the batches [0, 1, 2] and [3, 4, 5]
  for i in range(2):
    for split in ("train", "test"):
      decoded = {idx for s, idx in records[f"process{i}"]["decoded"] if s == split}
      drawn = {0, 5} if i == 0 and split == "test" else set()  # heatmap images: process 0 only
      assert decoded == set(own[i]) | drawn, (i, split)
