"""`train_and_evaluate(config, workdir)`: the PBAS protocol for every configured class.

Per class (`run_class`, top to bottom): load the test and train splits (`data`); their backbone
patch features, once (`feature_cache`: extracted, or reused from disk by any earlier run); the
runs' ABL centers and epochs (`train_runs` over the `engine`, resumable from checkpoints, curves
per epoch in `curves`); scores and maps of the reported state (`inference`); metrics, heatmaps and
the results rows (`report`). Checkpoints make the run resumable: the same command continues from
the latest checkpoint and skips finished classes.

On a device mesh (one device: a one-device mesh), the runs of a class (`train.num_runs` seeds x
`train.k_values` alphas) train together, each reported as if alone, in `<class>/<run name>/`.
"""
import dataclasses
import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from pbas_jax import checkpoint
from pbas_jax import config_base
from pbas_jax import curves
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import feature_cache
from pbas_jax import features as features_lib
from pbas_jax import fileio
from pbas_jax import heatmaps
from pbas_jax import inference
from pbas_jax import memory
from pbas_jax import metrics as metrics_lib
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax import train
from pbas_jax.data import demo as demo_data


class NonFiniteLossError(FloatingPointError):
  pass


def run_dirs(class_dir: str, runs: list[engine.Run]) -> list[str]:
  """Each run's folder (model, heatmaps, curves, best checkpoint): `class_dir` itself for a single
  run, `<class_dir>/<run.name>` for runs trained together."""
  return [class_dir] if len(runs) == 1 else [os.path.join(class_dir, run.name) for run in runs]


def _next_stop(epoch: int, epochs: int, *every: int) -> int:
  """The first epoch after `epoch` that is a multiple of one of `every` (0 = never), or `epochs`."""
  return min([epochs, *(epoch + e - epoch % e for e in every if e > 0)])


def _test_score(result: dict) -> float:
  """The reference's selection criterion: test I-AUROC + P-AUROC."""
  return (result["i_auroc"] or 0.0) + (result["p_auroc"] or 0.0)


def train_runs(config: ml_collections.ConfigDict, class_dir: str,
               train_split: feature_cache.Split, test: feature_cache.Split,
               runs: list[engine.Run], mesh: jax.sharding.Mesh
               ) -> list[tuple[train.TrainState, int]]:
  """ABL centers, then the epochs of `runs` of one class, resumable from `class_dir/checkpoints`.

  The runs train together (`engine`: a leading run axis, R = 1 for a single run), each as if
  alone; one engine call covers the epochs up to the next evaluation or checkpoint. Every epoch
  of every run is logged (`curves.EpochLog`: `metrics.jsonl` with `run`, `seed`, `alpha`, and
  TensorBoard curves).

  Returns:
    Per run, the state to report and its epoch: the last one, or the test-selected one under
    `eval.selection='test_oracle'` (test curves are recorded every `eval.every_epochs`).
  """
  epochs, dirs = config.train.epochs, run_dirs(class_dir, runs)
  features = train_split.features  # split over the mesh's data devices by the engine
  oracle = config.eval.selection == "test_oracle"
  every = config.eval.every_epochs or (1 if oracle else 0)
  chash = checkpoint.config_hash(config)
  ckpts = checkpoint.Checkpointer(os.path.join(class_dir, "checkpoints"))
  best_ckpts = ([checkpoint.Checkpointer(os.path.join(d, "best"), max_to_keep=1) for d in dirs]
                if oracle else [])
  start, best = ckpts.latest_epoch() or 0, [None] * len(runs)
  if start:
    states, meta = ckpts.restore(engine.state_template(config, runs, features.shape))
    checkpoint.check_compatible(meta, chash, ckpts.directory)
    best = meta["best"]
    logging.info("%s: resumed from epoch %d", class_dir, start)
  else:
    states = engine.init_states(config, runs, features, mesh)

  log = curves.EpochLog(class_dir, dirs, start)
  bar = tqdm.trange(start, epochs, initial=start, total=epochs, unit="epoch",
                    desc=os.path.basename(class_dir), disable=jax.process_index() != 0)

  def progress(done: int, m: dict):  # each epoch as it finishes, from inside the engine's call
    bar.set_postfix({name: f"{m[name][0]:.3g}" for name in ("loss", "p_true", "p_fake")
                     if name in m}, refresh=False)
    bar.update(done - bar.n)

  trainer = engine.Trainer(config, runs, mesh, on_epoch=progress)
  epoch = start
  try:
    while epoch < epochs:
      stop = _next_stop(epoch, epochs, every, config.train.checkpoint_every)
      states, per_epoch = trainer.train(states, features, epoch, stop - epoch)
      run_states = engine.unstack(states) if every and stop % every == 0 else None
      for done, run_metrics in enumerate(per_epoch, start=epoch + 1):
        for r, (run, m) in enumerate(zip(runs, run_metrics)):
          if not all(np.isfinite(v) for v in m.values()):
            raise NonFiniteLossError(
                f"{os.path.basename(class_dir)}{f' {run.name}' if len(runs) > 1 else ''}: "
                f"non-finite training metrics at epoch {done} ({m}); stopped. The last good "
                f"checkpoint (epoch {ckpts.latest_epoch()}) is kept in {ckpts.directory}; try a "
                "lower optim.lr / optim.dsc_lr.")
          record = {"epoch": done, "run": r, "seed": run.seed, "alpha": run.k, **m}
          if done == stop and run_states is not None:
            result = inference.evaluate(run_states[r], test, config, mesh)
            record.update({f"test_{k}": result[k] for k in report.METRIC_KEYS})
            if oracle and (best[r] is None or _test_score(result) > best[r]["score"]):
              best[r] = {"epoch": done, "score": _test_score(result)}
              best_ckpts[r].save(done, run_states[r], {"config_hash": chash, "epoch": done})
          log.write(r, record)
      bar.update(stop - bar.n)
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
  """Prepare, extract, train (or load), evaluate and report one class: a results row per run."""
  class_dir = os.path.join(workdir, f"{config.dataset.name}_{class_name}")
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
  test_src = data.load_configured(config, class_name, "test")
  train_src = None if config.eval.only else data.load_configured(config, class_name, "train")
  if train_src is not None:  # stop before any extraction when training cannot fit
    memory.check(config, len(train_src), features_lib.feature_shape(config), mesh, class_name)
  cropped = data.crop_losses(test_src).message()  # "" when the crop keeps every defect pixel
  if cropped:
    logging.warning("%s", cropped)
    notes.append(cropped)
  keep = heatmaps.heatmap_indices(len(test_src), config.eval.heatmaps)
  features_dir = os.path.join(fileio.cache_dir(), "features")
  test = feature_cache.load_or_extract(extractor, test_src, config, keep,
                                       f"{class_name} test features", directory=features_dir)
  if config.eval.only:
    missing = [model.directory for model, meta in zip(models, metas) if meta is None]
    if missing:
      raise FileNotFoundError(f"eval.only: no trained model in {missing[0]}; train first "
                              "(the same command without --config.eval.only)")
    template = engine.unstack(engine.state_template(config, runs[:1], test.features.shape))[0]
    trained = [(model.restore(template)[0], meta["epoch"]) for model, meta in zip(models, metas)]
  else:
    # Every training image: each run draws its own dataset.subsample from them (engine).
    train_split = feature_cache.load_or_extract(
        extractor, train_src, config, np.zeros(0, int), f"{class_name} train features",
        directory=features_dir)
    trained = train_runs(config, class_dir, train_split, test, runs, mesh)
    for model, (state, epoch) in zip(models, trained):
      model.save(epoch, state, {"config_hash": chash, "epoch": epoch})

  # Throughput of inference alone (backbone, heads, maps) on one batch, after compilation.
  bs = config.eval.batch_size  # each process decodes only its rows of the batch
  images = next(data.batches(test_src, bs, rows=sharding.example_rows(mesh, bs), prefetch=0))
  images_per_s = inference.images_per_second(extractor, trained[0][0], images["image"], bs,
                                             config, mesh)
  if len(runs) > 1:
    notes.append(f"{class_name}: {len(runs)} runs trained together; wall_time_s = the class's / R")
  if config.eval.selection == "test_oracle":
    notes.append("epoch: epochs trained (1-based); the reference's log prints the 0-based loop "
                 "index of the same epoch, i.e. epoch - 1")
  rows = []
  for r, (run, run_dir, (state, epoch)) in enumerate(zip(runs, dirs, trained)):
    scores, maps = inference.predict(state, test.features, config, mesh)
    result = metrics_lib.compute_all(scores, test.labels, maps, test.masks,
                                     config.eval.pro_variant)
    notes += [n for n in (f"{class_name}: {n}" for n in result.pop("notes")) if n not in notes]
    if len(keep) and jax.process_index() == 0:
      masks = None if test.masks is None else test.masks[keep]
      heatmaps.save_heatmaps(os.path.join(run_dir, "heatmaps"), test.images, masks, maps[keep],
                             [test.names[i] for i in keep], scores[keep], limit=-1,
                             value_range=(float(maps.min()), float(maps.max())))
    rows.append({"dataset": config.dataset.name, "class": class_name, "seed": run.seed,
                 **result, "epoch": epoch, "selection": config.eval.selection,
                 "images_per_s": images_per_s, "run": r, "alpha": run.k})
  for row in rows:  # the class's time, shared by its runs
    row["wall_time_s"] = (time.time() - t0) / len(runs)
  if jax.process_index() == 0:
    report.write_results(class_dir, rows, config.eval.selection, notes, files=("json",),
                         echo=False)
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured class; writes `<workdir>/results.{csv,json,md}`; returns results.json.

  Under `srun` with several tasks the processes have joined first (`main.py`:
  `sharding.initialize_distributed`); all devices of all processes form one mesh.
  """
  config_base.validate(config)
  mesh = engine.mesh_of(config)
  main_process = jax.process_index() == 0
  if main_process:
    os.makedirs(workdir, exist_ok=True)
    fileio.atomic_write(os.path.join(workdir, "config.json"),
                        config.to_json_best_effort(indent=2))
  notes = []
  if config.dataset.name == "demo":
    demo_data.make_demo_dataset(data.source_of(config)[1])
  if config.backbone.weights == "random":
    notes.append(f"backbone weights are random (seed {config.backbone.seed}): the numbers are "
                 "not meaningful")
  extractor = features_lib.extractor_of(config, mesh)
  rows, failed = [], []
  for class_name in data.class_names(config):
    try:
      rows += run_class(config, workdir, class_name, extractor, notes, mesh)
    except NonFiniteLossError as e:
      logging.error("%s", e)
      failed.append(str(e))
  results = None
  if rows:
    results = report.write_results(workdir, rows, config.eval.selection, notes + failed,
                                   files=("json", "csv", "md") if main_process else (),
                                   echo=main_process)
  if failed:
    raise NonFiniteLossError("; ".join(failed))
  return results
