"""`train_and_evaluate(config, workdir)`: the whole PBAS protocol for every configured class.

Per class: prepare the data; extract backbone patch features once (train and test, cached for the
whole run: the backbone is frozen and training has no augmentation); build the center bank (ABL);
train for the configured epochs with the jitted step over reshuffled cached features; evaluate;
write results, heatmaps and the final model. Checkpoints make the run resumable: the same command
continues from the latest checkpoint and skips finished classes.

Everything runs data parallel over all devices (`sharding`: batches split, state replicated; one
device is the plain case). Several runs of a class (`train.num_runs` seeds, `train.k_values`) train
together (`engine`: a leading run axis), each reported as if run alone, in
`<class>/<run name>/`.
"""
import dataclasses
import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from pbas_jax import backbones
from pbas_jax import checkpoint
from pbas_jax import data
from pbas_jax import engine
from pbas_jax.data import demo as demo_data
from pbas_jax import feature_cache
from pbas_jax import features as features_lib
from pbas_jax import fileio
from pbas_jax import heatmaps as heatmaps_lib
from pbas_jax import inference
from pbas_jax import metrics as metrics_lib
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax import train


class NonFiniteLossError(FloatingPointError):
  pass


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects values the locked ConfigDict accepts by type but the method cannot use."""
  choices = {
      "dataset.mask_mode": ("reference", "binary"),
      "model.center_init": ("alignment", "average", "iterative", "kmeans"),
      "model.center_metric": ("cosine", "euclidean"),
      "model.synthesis": ("ray", "gaussian"),
      "model.scoring": ("discriminator", "center_distance"),
      "train.cache_dtype": ("float32", "bfloat16"),
      "train.feature_cache": feature_cache.MODES,
      "train.compute_dtype": tuple(train.COMPUTE_DTYPES),
      "eval.selection": ("last", "test_oracle"),
      "eval.pro_variant": ("standard", "reference"),
  }
  for key, allowed in choices.items():
    section, name = key.split(".")
    value = config[section][name]
    if value not in allowed:
      raise ValueError(f"--config.{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
  positive = ("dataset.image_size", "dataset.resize", "dataset.batch_size", "train.epochs",
              "backbone.pretrain_dim", "backbone.target_dim", "eval.batch_size", "train.num_runs")
  for key in positive:
    section, name = key.split(".")
    if config[section][name] <= 0:
      raise ValueError(f"--config.{key} must be positive, got {config[section][name]}")
  engine.runs_of(config)  # names a repeated train.k_values entry
  if not config.model.rbo and config.model.scoring == "discriminator":
    raise ValueError("--config.model.rbo=False (ABL alone) trains no discriminator: set "
                     "--config.model.scoring=center_distance")
  if not 0 < config.dataset.subsample <= 1:
    raise ValueError(f"--config.dataset.subsample must be in (0, 1], got {config.dataset.subsample}")
  if config.dataset.name != "demo" and not config.dataset.root:
    raise ValueError(f"--config.dataset.root is empty: point it at the raw {config.dataset.name} "
                     "folder (e.g. --config.dataset.root=/data/mvtec)")


def cache_dir() -> str:
  return os.environ.get("PBAS_JAX_CACHE", os.path.expanduser("~/.cache/pbas_jax"))


def source_of(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(builder, raw root) of the configured dataset; `demo` is a folder dataset made on the spot."""
  if config.dataset.name == "demo":
    return "folder", config.dataset.root or os.path.join(cache_dir(), "demo")
  return config.dataset.name, config.dataset.root


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The configured classes, or every class of the dataset when `dataset.classes` is empty."""
  listed = [c.strip() for c in str(config.dataset.classes).split(",") if c.strip()]
  builder, root = source_of(config)
  return listed or data.classes(builder, root or None)


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where prepared datasets live: shared by every run (and sweep task) of this user."""
  return config.dataset.data_dir or os.path.join(cache_dir(), "tfds")


@functools.lru_cache(maxsize=8)
def _predictor(scoring: str, metric: str, size: int, sigma: float,
               mesh: jax.sharding.Mesh):
  """Jitted `(state, features (B, H, W, D)) -> (scores (B,), maps (B, S, S))`, per image.

  With `mesh` the images are split over its devices (`sharding.jit_per_example`).
  """
  def predict(state, features):
    patch = train.score_patches(state, features, scoring, metric)
    return inference.scores_and_maps(patch, size, sigma)

  return sharding.jit_per_example(predict, mesh)


def predict_split(state: train.TrainState, test: feature_cache.Split,
                  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Image scores (N,) and pixel maps (N, S, S) of the cached test features."""
  predict = _predictor(config.model.scoring, config.model.center_metric,
                       config.dataset.image_size, float(config.eval.smoothing_sigma), mesh)
  bs = config.eval.batch_size
  scores, maps = [], []
  for start in range(0, len(test.labels), bs):
    s, m = predict(state, test.features[start:start + bs])
    scores.append(sharding.to_host(s))
    maps.append(sharding.to_host(m))
  return np.concatenate(scores), np.concatenate(maps)


def evaluate(state: train.TrainState, test: feature_cache.Split,
             config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """The five metrics (fractions, None where undefined) of `state` on the test split."""
  scores, maps = predict_split(state, test, config, mesh)
  return metrics_lib.compute_all(scores, test.labels, maps, test.masks, config.eval.pro_variant)


def heatmap_indices(n: int, limit: int) -> np.ndarray:
  """Indices of the test images drawn as heatmaps: spread over the set (good and defective)."""
  count = n if limit < 0 else min(limit, n)
  return np.unique(np.linspace(0, n - 1, count).round().astype(int)) if count else np.zeros(0, int)


def _finite(metrics: dict) -> bool:
  return all(np.isfinite(v) for v in metrics.values())


class _MetricsLog:
  """`metrics.jsonl`: one JSON line per epoch; on resume, lines past the checkpoint are dropped."""

  def __init__(self, path: str, resume_epoch: int):
    self.path = path
    kept = []
    if resume_epoch and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= resume_epoch]
    fileio.atomic_write(path, "".join(kept))
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _test_score(result: dict) -> float:
  """The reference's selection criterion: test I-AUROC + P-AUROC."""
  return (result["i_auroc"] or 0.0) + (result["p_auroc"] or 0.0)


def run_dirs(class_dir: str, runs: list[engine.Run]) -> list[str]:
  """Each run's folder (model, heatmaps, best checkpoint): `class_dir` itself for a single run,
  `<class_dir>/<run.name>` for runs trained together."""
  return [class_dir] if len(runs) == 1 else [os.path.join(class_dir, run.name) for run in runs]


def _next_stop(epoch: int, epochs: int, *every: int) -> int:
  """The first epoch after `epoch` that is a multiple of one of `every` (0 = never), or `epochs`."""
  stops = [epoch + e - epoch % e for e in every if e > 0]
  return min([epochs, *stops])


def train_runs(config: ml_collections.ConfigDict, class_dir: str,
               train_split: feature_cache.Split, test: feature_cache.Split,
               runs: list[engine.Run], mesh: jax.sharding.Mesh
               ) -> list[tuple[train.TrainState, int]]:
  """ABL centers, then the epochs of `runs` of one class, resumable from `class_dir/checkpoints`.

  The runs train together (`engine`: a leading run axis, R = 1 for a single run), each as if
  alone; one engine call covers the epochs up to the next evaluation or checkpoint.
  `metrics.jsonl` gets one line per epoch and run (with `run`, `seed`, `alpha`).

  Returns:
    Per run, the state to report and its epoch: the last one, or the test-selected one under
    `eval.selection='test_oracle'` (test curves are recorded every `eval.every_epochs`).
  """
  epochs, multi = config.train.epochs, len(runs) > 1
  features = sharding.put(train_split.features, sharding.replicated(mesh))  # once per device
  oracle = config.eval.selection == "test_oracle"
  every = config.eval.every_epochs or (1 if oracle else 0)
  chash = checkpoint.config_hash(config)
  ckpts = checkpoint.Checkpointer(os.path.join(class_dir, "checkpoints"))
  best_ckpts = [checkpoint.Checkpointer(os.path.join(d, "best"), max_to_keep=1)
                for d in run_dirs(class_dir, runs)] if oracle else []
  start, best = ckpts.latest_epoch() or 0, [None] * len(runs)
  if start:
    states, meta = ckpts.restore(engine.state_template(config, runs, features.shape))
    checkpoint.check_compatible(meta, chash, ckpts.directory)
    best = meta["best"]
    logging.info("%s: resumed from epoch %d", class_dir, start)
  else:
    states = engine.init_states(config, runs, features, mesh)

  trainer = engine.Trainer(config, runs, mesh)
  log = _MetricsLog(os.path.join(class_dir, "metrics.jsonl"), start)
  bar = tqdm.trange(start, epochs, initial=start, total=epochs, unit="epoch",
                    desc=os.path.basename(class_dir))
  epoch = start
  try:
    while epoch < epochs:
      stop = _next_stop(epoch, epochs, every, config.train.checkpoint_every)
      states, per_epoch = trainer.train(states, features, epoch, stop - epoch)
      run_states = engine.unstack(states) if every and stop % every == 0 else None
      for done, run_metrics in enumerate(per_epoch, start=epoch + 1):
        for r, (run, m) in enumerate(zip(runs, run_metrics)):
          if not _finite(m):
            raise NonFiniteLossError(
                f"{os.path.basename(class_dir)}{f' {run.name}' if multi else ''}: non-finite "
                f"training metrics at epoch {done} ({m}); stopped. The last good checkpoint "
                f"(epoch {ckpts.latest_epoch()}) is kept in {ckpts.directory}; try a lower "
                "optim.lr / optim.dsc_lr.")
          record = {"epoch": done, "run": r, "seed": run.seed, "alpha": run.k, **m}
          if done == stop and run_states is not None:
            result = evaluate(run_states[r], test, config, mesh)
            record.update({f"test_{k}": result[k] for k in report.METRIC_KEYS})
            if oracle and (best[r] is None or _test_score(result) > best[r]["score"]):
              best[r] = {"epoch": done, "score": _test_score(result)}
              best_ckpts[r].save(done, run_states[r], {"config_hash": chash, "epoch": done})
          log.write(record)
      m = per_epoch[-1][0]
      bar.set_postfix({name: f"{m[name]:.3g}" for name in ("loss", "p_true", "p_fake")
                       if name in m}, refresh=False)
      bar.update(stop - epoch)
      epoch = stop
      if epoch % config.train.checkpoint_every == 0 or epoch == epochs:
        ckpts.save(epoch, states, {"config_hash": chash, "epoch": epoch, "best": best,
                                   "runs": [dataclasses.asdict(run) for run in runs]})
  finally:
    log.close()
    bar.close()
  final = engine.unstack(states)
  if oracle:
    return [(ckpt.restore(s, b["epoch"])[0], b["epoch"])
            for ckpt, s, b in zip(best_ckpts, final, best)]
  return [(s, epochs) for s in final]


def run_class(config: ml_collections.ConfigDict, workdir: str, class_name: str, extractor,
              notes: list[str], mesh: jax.sharding.Mesh) -> list[dict]:
  """Prepare, extract, train (or load), evaluate and report one class; returns its results rows.

  One row per run of `engine.runs_of(config)`; rows of runs trained together carry `run` and
  `alpha` as well.
  """
  name = config.dataset.name
  class_dir = os.path.join(workdir, f"{name}_{class_name}")
  results_path = os.path.join(class_dir, "results.json")
  runs = engine.runs_of(config)
  dirs = run_dirs(class_dir, runs)
  models = [checkpoint.Checkpointer(os.path.join(d, "model"), max_to_keep=1) for d in dirs]
  chash = checkpoint.config_hash(config)
  metas = [model.meta() for model in models]
  for meta, model in zip(metas, models):
    if meta:
      checkpoint.check_compatible(meta, chash, model.directory)
  if all(metas) and not config.eval.only and os.path.exists(results_path):
    logging.info("%s is finished (%s); delete it to train again", class_name, results_path)
    with open(results_path) as f:
      return json.load(f)["rows"]

  t0 = time.time()
  split_args = dict(data_dir=data_dir(config), image_size=config.dataset.image_size,
                    resize=config.dataset.resize, resize_mode=config.dataset.resize_mode,
                    mask_mode=config.dataset.mask_mode)
  builder, root = source_of(config)
  test_src = data.load_split(builder, root, class_name, "test", **split_args)
  cropped = data.crop_losses(test_src).message()  # "" when the crop keeps every defect pixel
  if cropped:
    logging.warning("%s", cropped)
    notes.append(cropped)
  keep = heatmap_indices(len(test_src), config.eval.heatmaps)
  t_test = time.time()
  features_dir = os.path.join(cache_dir(), "features")
  test = feature_cache.load_or_extract(extractor, test_src, config, keep,
                                       f"{class_name} test features", directory=features_dir)
  t_test = time.time() - t_test

  if config.eval.only:
    missing = [model.directory for model, meta in zip(models, metas) if meta is None]
    if missing:
      raise FileNotFoundError(f"eval.only: no trained model in {missing[0]}; train first "
                              "(the same command without --config.eval.only)")
    template = engine.unstack(engine.state_template(config, runs[:1], test.features.shape))[0]
    trained = [(model.restore(template)[0], meta["epoch"]) for model, meta in zip(models, metas)]
  else:
    train_src = data.load_split(builder, root, class_name, "train", **split_args)
    subset = (data.subsample_indices(len(train_src), config.dataset.subsample, config.train.seed)
              if config.dataset.subsample < 1 else None)
    train_split = feature_cache.load_or_extract(extractor, train_src, config, np.zeros(0, int),
                                                f"{class_name} train features", subset,
                                                directory=features_dir)
    trained = train_runs(config, class_dir, train_split, test, runs, mesh)
    for model, (state, epoch) in zip(models, trained):
      model.save(epoch, state, {"config_hash": chash, "epoch": epoch})

  if len(runs) > 1:
    notes.append(f"{class_name}: {len(runs)} runs trained together (vmapped); each row's "
                 "wall_time_s is the class's time divided by the runs")
  rows = []
  for r, (run, run_dir, (state, epoch)) in enumerate(zip(runs, dirs, trained)):
    t_pred = time.time()
    scores, maps = predict_split(state, test, config, mesh)
    t_pred = time.time() - t_pred
    result = metrics_lib.compute_all(scores, test.labels, maps, test.masks,
                                     config.eval.pro_variant)
    notes += [n for n in (f"{class_name}: {n}" for n in result.pop("notes")) if n not in notes]
    if len(keep):
      masks = None if test.masks is None else test.masks[keep]
      heatmaps_lib.save_heatmaps(os.path.join(run_dir, "heatmaps"), test.images, masks,
                                 maps[keep], [test.names[i] for i in keep], scores[keep],
                                 limit=-1, value_range=(float(maps.min()), float(maps.max())))
    rows.append({"dataset": name, "class": class_name, "seed": run.seed, **result,
                 "epoch": epoch, "selection": config.eval.selection, "wall_time_s": None,
                 "images_per_s": len(test.labels) / (t_test + t_pred),
                 "run": r, "alpha": run.k})
  wall_time = (time.time() - t0) / len(runs)
  for row in rows:
    row["wall_time_s"] = wall_time
  report.write_results(class_dir, rows, config.eval.selection, notes, files=("json",),
                       echo=False)
  return rows


def make_extractor(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The configured frozen backbone + patch features: images (B, S, S, 3) -> (B, H, W, D)."""
  b = config.backbone
  variables = backbones.load_variables(b.name, b.weights, seed=b.seed,
                                       cache_dir=b.cache_dir or None)
  return features_lib.make_extractor(b.name, variables, tuple(b.layers), b.patch_size,
                                     b.pretrain_dim, b.target_dim, mesh=mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured class; writes `<workdir>/results.{csv,json,md}`; returns results.json.

  Under `srun` with several tasks the processes first join (`sharding.initialize_distributed`);
  all devices of all processes then form one data-parallel mesh.
  """
  validate(config)
  sharding.initialize_distributed()
  mesh = sharding.make_mesh()
  os.makedirs(workdir, exist_ok=True)
  fileio.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  notes = []
  if config.dataset.name == "demo":
    demo_data.make_demo_dataset(source_of(config)[1])
  if config.backbone.weights == "random":
    notes.append(f"backbone weights are random (seed {config.backbone.seed}): the numbers are "
                 "not meaningful")
  extractor = make_extractor(config, mesh)
  rows, failed = [], []
  for class_name in class_names(config):
    try:
      rows += run_class(config, workdir, class_name, extractor, notes, mesh)
    except NonFiniteLossError as e:
      logging.error("%s", e)
      failed.append(str(e))
  results = report.write_results(workdir, rows, config.eval.selection, notes + failed) \
      if rows else None
  if failed:
    raise NonFiniteLossError("; ".join(failed))
  return results
