"""`train_and_evaluate(config, workdir)`: the whole PBAS protocol for every configured class.

Per class: prepare the data; extract backbone patch features once (train and test, cached for the
whole run: the backbone is frozen and training has no augmentation); build the center bank (ABL);
train for the configured epochs with the jitted step over reshuffled cached features; evaluate;
write results, heatmaps and the final model. Checkpoints make the run resumable: the same command
continues from the latest checkpoint and skips finished classes.
"""
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from pbas_jax import backbones
from pbas_jax import center as center_lib
from pbas_jax import checkpoint
from pbas_jax import data
from pbas_jax.data import demo as demo_data
from pbas_jax import features as features_lib
from pbas_jax import inference
from pbas_jax import metrics as metrics_lib
from pbas_jax import report
from pbas_jax import train


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class Split:
  """One split of a class, with its backbone patch features computed once.

  features: (N, H, W, D) in the cache dtype; labels: (N,); masks: (N, S, S) or None;
  names: N source file names; images: the first few preprocessed images (for heatmap panels).
  """
  features: Any
  labels: np.ndarray
  masks: np.ndarray | None
  names: list[str]
  defect_types: list[str]
  images: np.ndarray


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects values the locked ConfigDict accepts by type but the method cannot use."""
  choices = {
      "dataset.mask_mode": ("reference", "binary"),
      "model.center_init": ("alignment", "average", "iterative", "kmeans"),
      "model.center_metric": ("cosine", "euclidean"),
      "model.synthesis": ("ray", "gaussian"),
      "model.scoring": ("discriminator", "center_distance"),
      "train.cache_dtype": ("float32", "bfloat16"),
      "train.cache_device": ("auto", "device", "host"),
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


def _store(x: jax.Array, config: ml_collections.ConfigDict) -> Any:
  """Keeps one batch of features in the cache dtype, on device or on host."""
  x = x.astype(jnp.bfloat16 if config.train.cache_dtype == "bfloat16" else jnp.float32)
  return np.asarray(x) if config.train.cache_device == "host" else x


def extract_split(extractor, source: data.Source, config: ml_collections.ConfigDict,
                  keep: np.ndarray, desc: str, indices: np.ndarray | None = None) -> Split:
  """Runs the frozen backbone once over `source` (ordered) and keeps its patch features.

  `keep` are the indices of the images kept (preprocessed) for heatmap panels; `indices` restricts
  the split to a subset (training-set subsampling).
  """
  feats, labels, masks, names, types, images = [], [], [], [], [], []
  bs = config.eval.batch_size
  count = len(source) if indices is None else len(indices)
  for batch in tqdm.tqdm(data.batches(source, bs, indices=indices), desc=desc, unit="batch",
                         total=-(-count // bs), leave=False):
    valid = int(batch["valid"].sum())
    feats.append(_store(extractor(batch["image"])[:valid], config))
    labels.append(batch["label"][:valid])
    masks.append(batch["mask"][:valid])
    names += [f"{t}/{os.path.splitext(os.path.basename(f))[0]}"
              for t, f in zip(batch["defect_type"][:valid], batch["filename"][:valid])]
    types += list(batch["defect_type"][:valid])
    images.append(batch["image"][:valid][np.isin(batch["index"][:valid], keep)])
  concat = np.concatenate if config.train.cache_device == "host" else jnp.concatenate
  return Split(features=concat(feats), labels=np.concatenate(labels),
               masks=np.concatenate(masks) if source.has_masks else None,
               names=names, defect_types=types, images=np.concatenate(images))


def predict_split(state: train.TrainState, test: Split, config: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Image scores (N,) and pixel maps (N, S, S) of the cached test features."""
  size, bs = config.dataset.image_size, config.eval.batch_size
  scores, maps = [], []
  for start in range(0, len(test.labels), bs):
    patch = train.score_patches(state, test.features[start:start + bs], config.model.scoring,
                                config.model.center_metric)
    s, m = inference.scores_and_maps(patch, size, config.eval.smoothing_sigma)
    scores.append(np.asarray(s))
    maps.append(np.asarray(m))
  return np.concatenate(scores), np.concatenate(maps)


def evaluate(state: train.TrainState, test: Split, config: ml_collections.ConfigDict) -> dict:
  """The five metrics (fractions, None where undefined) of `state` on the test split."""
  scores, maps = predict_split(state, test, config)
  return metrics_lib.compute_all(scores, test.labels, maps, test.masks, config.eval.pro_variant)


def heatmap_indices(n: int, limit: int) -> np.ndarray:
  """Indices of the test images drawn as heatmaps: spread over the set (good and defective)."""
  count = n if limit < 0 else min(limit, n)
  return np.unique(np.linspace(0, n - 1, count).round().astype(int)) if count else np.zeros(0, int)


def center_batches(features, key: jax.Array, batch_size: int):
  """The cached training features in one shuffled pass, as the reference's loader feeds ABL."""
  order = np.asarray(jax.random.permutation(key, features.shape[0]))
  for start in range(0, len(order), batch_size):
    yield features[order[start:start + batch_size]]


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
    report.atomic_write(path, "".join(kept))
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _test_score(result: dict) -> float:
  """The reference's selection criterion: test I-AUROC + P-AUROC."""
  return (result["i_auroc"] or 0.0) + (result["p_auroc"] or 0.0)


def state_template(config: ml_collections.ConfigDict, features_shape) -> train.TrainState:
  """A train state of the right structure and shapes to restore a checkpoint into.

  features_shape: (..., H, W, D) of the cached patch features.
  """
  *_, h, w, dim = features_shape
  state = train.create_train_state(config, jax.random.key(0), dim)
  return state.replace(center=jnp.zeros((h * w, dim), jnp.float32))


def train_class(config: ml_collections.ConfigDict, class_dir: str, train_split: Split,
                test: Split) -> tuple[train.TrainState, int]:
  """ABL center, then the epochs of training, resumable from `class_dir/checkpoints`.

  Returns the state to report and its epoch: the last one, or the test-selected one under
  `eval.selection='test_oracle'` (test curves are recorded every `eval.every_epochs`).
  """
  features, bs, epochs = train_split.features, config.dataset.batch_size, config.train.epochs
  oracle = config.eval.selection == "test_oracle"
  chash = checkpoint.config_hash(config)
  k_init, k_center, k_train = jax.random.split(jax.random.key(config.train.seed), 3)
  state = train.create_train_state(config, k_init, features.shape[-1])
  ckpts = checkpoint.Checkpointer(os.path.join(class_dir, "checkpoints"))
  best_ckpt = (checkpoint.Checkpointer(os.path.join(class_dir, "best"), max_to_keep=1)
               if oracle else None)
  start, best = ckpts.latest_epoch() or 0, None
  if start:
    state, meta = ckpts.restore(state_template(config, features.shape))
    checkpoint.check_compatible(meta, chash, ckpts.directory)
    best = meta.get("best")
    logging.info("%s: resumed from epoch %d", class_dir, start)
  else:
    center = center_lib.init_center(
        state.project, center_batches(features, k_center, bs), config.model.center_init,
        config.model.center_metric, config.model.center_ema, key=k_center,
        kmeans_iters=config.model.kmeans_iters)
    state = state.replace(center=center)

  step_fn = train.make_jit_train_step(config)
  log = _MetricsLog(os.path.join(class_dir, "metrics.jsonl"), start)
  bar = tqdm.trange(start, epochs, initial=start, total=epochs, unit="epoch",
                    desc=os.path.basename(class_dir))
  try:
    for epoch in bar:
      done = epoch + 1
      state, m = train.train_epoch(step_fn, state, features, jax.random.fold_in(k_train, epoch), bs)
      if not _finite(m):
        raise NonFiniteLossError(
            f"{os.path.basename(class_dir)}: non-finite training metrics at epoch {done} ({m}); "
            f"stopped. The last good checkpoint (epoch {ckpts.latest_epoch()}) is kept in "
            f"{ckpts.directory}; try a lower optim.lr / optim.dsc_lr.")
      record = {"epoch": done, **m}
      every = config.eval.every_epochs or (1 if oracle else 0)
      if every and done % every == 0:
        result = evaluate(state, test, config)
        record.update({f"test_{k}": result[k] for k in report.METRIC_KEYS})
        if oracle and (best is None or _test_score(result) > best["score"]):
          best = {"epoch": done, "score": _test_score(result)}
          best_ckpt.save(done, state, {"config_hash": chash, "epoch": done})
      log.write(record)
      bar.set_postfix(loss=f"{m['loss']:.3g}", p_true=f"{m['p_true']:.2f}",
                      p_fake=f"{m['p_fake']:.2f}", refresh=False)
      if done % config.train.checkpoint_every == 0 or done == epochs:
        ckpts.save(done, state, {"config_hash": chash, "epoch": done, "best": best,
                                 "data_key": np.asarray(jax.random.key_data(k_train)).tolist()})
  finally:
    log.close()
    bar.close()
  if oracle:
    state, _ = best_ckpt.restore(state, best["epoch"])
    return state, best["epoch"]
  return state, epochs


def run_class(config: ml_collections.ConfigDict, workdir: str, class_name: str, extractor,
              notes: list[str]) -> dict:
  """Prepare, extract, train (or load), evaluate and report one class; returns its results row."""
  name = config.dataset.name
  class_dir = os.path.join(workdir, f"{name}_{class_name}")
  results_path = os.path.join(class_dir, "results.json")
  model = checkpoint.Checkpointer(os.path.join(class_dir, "model"), max_to_keep=1)
  chash = checkpoint.config_hash(config)
  meta = model.meta()
  if meta and not config.eval.only and os.path.exists(results_path):
    checkpoint.check_compatible(meta, chash, model.directory)
    logging.info("%s is finished (%s); delete it to train again", class_name, results_path)
    with open(results_path) as f:
      return json.load(f)["rows"][0]

  t0 = time.time()
  split_args = dict(data_dir=data_dir(config), image_size=config.dataset.image_size,
                    resize=config.dataset.resize, mask_mode=config.dataset.mask_mode)
  builder, root = source_of(config)
  test_src = data.load_split(builder, root, class_name, "test", **split_args)
  keep = heatmap_indices(len(test_src), config.eval.heatmaps)
  t_test = time.time()
  test = extract_split(extractor, test_src, config, keep, f"{class_name} test features")
  t_test = time.time() - t_test

  if config.eval.only:
    if meta is None:
      raise FileNotFoundError(f"eval.only: no trained model in {model.directory}; train first "
                              "(the same command without --config.eval.only)")
    checkpoint.check_compatible(meta, chash, model.directory)
    state, _ = model.restore(state_template(config, test.features.shape))
    epoch = meta["epoch"]
  else:
    train_src = data.load_split(builder, root, class_name, "train", **split_args)
    subset = (data.subsample_indices(len(train_src), config.dataset.subsample, config.train.seed)
              if config.dataset.subsample < 1 else None)
    train_split = extract_split(extractor, train_src, config, np.zeros(0, int),
                                f"{class_name} train features", subset)
    state, epoch = train_class(config, class_dir, train_split, test)
    model.save(epoch, state, {"config_hash": chash, "epoch": epoch})

  t_pred = time.time()
  scores, maps = predict_split(state, test, config)
  t_pred = time.time() - t_pred
  result = metrics_lib.compute_all(scores, test.labels, maps, test.masks, config.eval.pro_variant)
  notes += [f"{class_name}: {n}" for n in result.pop("notes")]
  if len(keep):
    masks = None if test.masks is None else test.masks[keep]
    report.save_heatmaps(os.path.join(class_dir, "heatmaps"), test.images, masks, maps[keep],
                         [test.names[i] for i in keep], scores[keep], limit=-1,
                         value_range=(float(maps.min()), float(maps.max())))
  row = {"dataset": name, "class": class_name, "seed": config.train.seed, **result,
         "epoch": epoch, "selection": config.eval.selection,
         "wall_time_s": time.time() - t0, "images_per_s": len(test.labels) / (t_test + t_pred)}
  report.write_results(class_dir, [row], config.eval.selection, notes, files=("json",),
                       echo=False)
  return row


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured class; writes `<workdir>/results.{csv,json,md}`; returns results.json."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  report.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  notes = []
  if config.dataset.name == "demo":
    demo_data.make_demo_dataset(source_of(config)[1])
  if config.backbone.weights == "random":
    notes.append(f"backbone weights are random (seed {config.backbone.seed}): the numbers are "
                 "not meaningful")
  variables = backbones.load_variables(config.backbone.name, config.backbone.weights,
                                       seed=config.backbone.seed,
                                       cache_dir=config.backbone.cache_dir or None)
  extractor = features_lib.make_extractor(
      config.backbone.name, variables, tuple(config.backbone.layers), config.backbone.patch_size,
      config.backbone.pretrain_dim, config.backbone.target_dim)
  rows, failed = [], []
  for class_name in class_names(config):
    try:
      rows.append(run_class(config, workdir, class_name, extractor, notes))
    except NonFiniteLossError as e:
      logging.error("%s", e)
      failed.append(str(e))
  results = report.write_results(workdir, rows, config.eval.selection, notes + failed) \
      if rows else None
  if failed:
    raise NonFiniteLossError("; ".join(failed))
  return results
