"""A trained class read back from its workdir (config, each run's state and decision thresholds),
and scoring a folder of images with it in JAX (`pbas_jax.predict --workdir`).

Reads the run's `config.json`, the class's trained models (`<class>/model`, or
`<class>/<run>/model` for runs trained together) and its `results.json` (the thresholds), all
written by `pbas_jax.main`. `pbas_jax.export` turns the same into ONNX files.
"""
import dataclasses
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pbas_jax import backbones
from pbas_jax import checkpoint
from pbas_jax import deploy
from pbas_jax import engine
from pbas_jax import experiment
from pbas_jax import features as features_lib
from pbas_jax import inference
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax import train
from pbas_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """One trained run of a class: its name (its folder when several train together), `engine.Run`,
  index in the class's results rows, state, epoch, and decision (`report.DECISION_KEYS`; None
  for a class reported before thresholds existed)."""
  name: str
  run: engine.Run
  index: int
  state: train.TrainState
  epoch: int
  decision: dict | None


def class_dir(workdir: str, config: ml_collections.ConfigDict, class_name: str) -> str:
  return os.path.join(workdir, f"{config.dataset.name}_{class_name}")


def model_dirs(workdir: str, class_name: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's config and `{run name: model folder}` of the class's trained runs.

  A single run keeps its model in `<class dir>/model`; runs trained together each in
  `<class dir>/<run name>/model`. Raises, naming the folders looked in, when none has a model;
  creates nothing.
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a run directory of "
                            "pbas_jax.main")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  runs = engine.runs_of(config)
  dirs = {run.name: os.path.join(d, "model")
          for run, d in zip(runs, experiment.run_dirs(class_dir(workdir, config, class_name),
                                                      runs))}
  found = {name: d for name, d in dirs.items() if os.path.isdir(d) and os.listdir(d)}
  if not found:
    raise FileNotFoundError(f"no trained model of class {class_name} in {', '.join(dirs.values())}"
                            f": train it with pbas_jax.main first (same --workdir)")
  return config, found


def geometry(config: ml_collections.ConfigDict, class_name: str) -> preprocess.Geometry:
  """The class's preprocessing geometry, as training resolved it; runs from before resize_mode
  existed cropped."""
  return preprocess.geometry(config.dataset.name, class_name, config.dataset.image_size,
                             config.dataset.resize, config.dataset.get("resize_mode", "crop"))


def features_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, D) of the configured backbone's patch features at `dataset.image_size`."""
  b, size = config.backbone, config.dataset.image_size
  module = backbones.create(b.name, tuple(b.layers))
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  shape = jax.eval_shape(lambda v, x: features_lib.patch_features(
      module.apply(v, x), b.patch_size, b.pretrain_dim, b.target_dim), variables, images).shape
  return shape[1:]


def load(workdir: str, class_name: str
         ) -> tuple[ml_collections.ConfigDict, list[TrainedRun]]:
  """The run's config and every trained run of the class, restored."""
  config, models = model_dirs(workdir, class_name)
  template = engine.unstack(engine.state_template(config, engine.runs_of(config)[:1],
                                                  features_shape(config)))[0]
  results = os.path.join(class_dir(workdir, config, class_name), "results.json")
  rows = {}
  if os.path.exists(results):
    with open(results) as f:
      rows = {row.get("run", 0): row for row in json.load(f)["rows"]}
  trained = []
  for index, run in enumerate(engine.runs_of(config)):
    if run.name not in models:
      continue
    state, meta = checkpoint.Checkpointer(models[run.name], max_to_keep=1).restore(template)
    row = rows.get(index, {})
    decision = ({k: row.get(k) for k in report.DECISION_KEYS} if row.get("threshold") is not None
                else None)
    if decision is None:
      logging.warning("%s %s: no decision threshold in %s (reported before thresholds existed, "
                      "or not reported yet): scores only. Rerun the main job's command with "
                      "--config.eval.only=True to compute it.", class_name, run.name, results)
    trained.append(TrainedRun(run.name, run, index, state, meta["epoch"], decision))
  return config, trained


def predict_folder(workdir: str, class_name: str, image_dir: str, output: str,
                   heatmaps: int = -1, threshold: float | None = None,
                   pixel_threshold: float | None = None
                   ) -> tuple[list[str], dict[str, deploy.Scored], list[tuple[str, str]]]:
  """Scores every image file of `image_dir` with each trained run of the class.

  Images are preprocessed as in training and scored by the evaluation's inference code, on all
  devices; an unreadable image is skipped and reported (`deploy.read_images`). Writes
  `deploy.write_predictions`' outputs (scores.csv with each run's scores and decisions, heatmaps,
  defect masks) to `output`. `threshold` / `pixel_threshold` replace the runs' own.

  Returns:
    (names scored, {run name: deploy.Scored}, skipped (name, why)).
  """
  config, runs = load(workdir, class_name)
  images, names, skipped = deploy.read_images(deploy.image_paths(image_dir),
                                              geometry(config, class_name))
  mesh = sharding.make_mesh()
  extractor = features_lib.extractor_of(config, mesh)
  bs = config.eval.batch_size
  features = [extractor(images[start:start + bs]) for start in range(0, len(images), bs)]
  scored = {}
  for r in runs:
    parts = [inference.predict(r.state, f, config, mesh) for f in features]
    scores, maps = (np.concatenate(p) for p in zip(*parts))
    decision = r.decision or {}
    scored[r.name] = deploy.Scored(
        scores, maps,
        decision.get("threshold") if threshold is None else threshold,
        decision.get("pixel_threshold") if pixel_threshold is None else pixel_threshold)
  deploy.write_predictions(output, names, images, scored, skipped, heatmaps)
  return names, scored, skipped
