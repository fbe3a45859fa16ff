"""`train_and_evaluate(config, workdir)`: the PBAS protocol for every configured class.

Per class (`run_class`, top to bottom): load the test and train splits (`data`); their backbone
patch features, once (`feature_cache`: extracted, or reused from disk by any earlier run); the
runs' ABL centers and epochs (`train_runs` over the `engine`, resumable from checkpoints, curves
per epoch in `curves`); scores and maps of the reported state (`inference`); metrics, heatmaps and
the results rows (`report`). The same command finishes what an earlier run left, wherever it was
stopped: training continues from the latest checkpoint (which records the data it was trained
on), the rest is redone from the trained states, and the class's results.json, written last,
marks it finished.

On a device mesh (one device: a one-device mesh), the runs of a class (`train.num_runs` seeds x
`train.k_values` alphas) train together, each reported as if alone, in `<class>/<run name>/`.
"""
import dataclasses
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
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


class DataChangedError(RuntimeError):
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


def _finite_runs(states: train.TrainState) -> np.ndarray:
  """(R,) bool: whether every float of each run's state is finite."""
  finite = [sharding.to_host(jnp.isfinite(x).reshape(x.shape[0], -1).all(1))
            for x in jax.tree.leaves(states) if jnp.issubdtype(x.dtype, jnp.floating)]
  return np.logical_and.reduce(finite)


def _hold(states: train.TrainState, held: train.TrainState, mask: np.ndarray
          ) -> train.TrainState:
  """`states` with the runs where `mask (R,)` is True taken from `held` (placed as `states`)."""
  return jax.tree.map(lambda s, h: jnp.where(mask.reshape((-1,) + (1,) * (s.ndim - 1)),
                                             jax.device_put(h, s.sharding), s), states, held)


def _last_good(ckpts: checkpoint.Checkpointer, template: train.TrainState, r: int
               ) -> tuple[train.TrainState | None, int | None]:
  """The latest checkpoint (stacked states, epoch) in which run `r`'s state is finite."""
  for epoch in reversed(ckpts.epochs()):
    states, _ = ckpts.restore(template, epoch)
    if _finite_runs(states)[r]:
      return states, epoch
  return None, None


def train_runs(config: ml_collections.ConfigDict, class_dir: str,
               train_split: feature_cache.Split, test: feature_cache.Split,
               runs: list[engine.Run], mesh: jax.sharding.Mesh, trained_on: dict | None = None
               ) -> list[tuple[train.TrainState | None, int]]:
  """ABL centers, then the epochs of `runs` of one class, resumable from `class_dir/checkpoints`.

  The runs train together (`engine`: a leading run axis, R = 1 for a single run), each as if
  alone; one engine call covers the epochs up to the next evaluation or checkpoint. Every epoch
  of every run is logged (`curves.EpochLog`: `metrics.jsonl` with `run`, `seed`, `alpha`, and
  TensorBoard curves).

  A run whose training metrics turn non-finite has diverged: it is logged as an error and stops
  (no more curves or evaluations); the others go on. From then on its slice of the stacked state
  is held at its last good checkpointed state, so the class's checkpoints keep that state.

  `trained_on`: what the training data is (`feature_cache.key_fields` of the training split),
  recorded in the checkpoints; a resume from checkpoints of other data raises DataChangedError.

  Returns:
    Per run, the state to report and its epoch: the last one, or the test-selected one under
    `eval.selection='test_oracle'` (test curves are recorded every `eval.every_epochs`); for a run
    that diverged, None and the epoch whose metrics were non-finite.
  """
  epochs, dirs = config.train.epochs, run_dirs(class_dir, runs)
  features = train_split.features  # split over the mesh's data devices by the engine
  oracle = config.eval.selection == "test_oracle"
  every = config.eval.every_epochs or (1 if oracle else 0)
  chash = checkpoint.config_hash(config)
  ckpts = checkpoint.Checkpointer(os.path.join(class_dir, "checkpoints"))
  best_ckpts = ([checkpoint.Checkpointer(os.path.join(d, "best"), max_to_keep=None)
                 for d in dirs] if oracle else [])
  start = ckpts.latest_epoch() or 0
  best, diverged = [None] * len(runs), [None] * len(runs)
  if start:
    states, meta = ckpts.restore(engine.state_template(config, runs, features.shape))
    checkpoint.check_compatible(meta, chash, ckpts.directory)
    if trained_on and not meta.get("data"):
      logging.warning("%s: its checkpoints do not record their training data (written before "
                      "that was recorded); resuming without comparing it", class_dir)
    changes = (feature_cache.data_changes(meta["data"], trained_on)
               if trained_on and meta.get("data") else [])
    if changes:
      raise DataChangedError(
          f"{ckpts.directory} holds a training interrupted at epoch {start} on other data: "
          f"{'; '.join(changes)} changed since. Resuming would train on both. To train on the "
          f"data as it is now, delete {class_dir} (or use a new --workdir); to finish the "
          "interrupted training, restore the data it started on.")
    best, diverged = meta["best"], meta.get("diverged", diverged)
    logging.info("%s: resumed from epoch %d", class_dir, start)
  else:
    states = engine.init_states(config, runs, features, mesh)
  # best/ keeps the best epoch the latest checkpoint records: best epochs saved after it (by an
  # interrupted run) are evaluated again from there.
  for ckpt, b in zip(best_ckpts, best):
    ckpt.keep([b and b["epoch"]])
  held_runs = np.array([d is not None and d["good_epoch"] is not None for d in diverged])
  held = ckpts.restore(states)[0] if held_runs.any() else None  # diverged runs' last good states

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
      for done, run_metrics in enumerate(per_epoch, start=epoch + 1):
        for r, (run, m) in enumerate(zip(runs, run_metrics)):
          if diverged[r] is None and not all(np.isfinite(v) for v in m.values()):
            good, good_epoch = _last_good(ckpts, states, r)
            diverged[r] = {"epoch": done, "good_epoch": good_epoch}
            if good is not None:
              held = good if held is None else _hold(held, good, np.arange(len(runs)) == r)
              held_runs[r] = True
            logging.error(
                "%s%s: non-finite training metrics at epoch %d (%s): this run diverged and "
                "stops; %s The other runs go on. Try a lower optim.lr / optim.dsc_lr.",
                os.path.basename(class_dir), f" {run.name}" if len(runs) > 1 else "", done, m,
                "no checkpoint holds a finite state of it." if good is None else
                f"its last good state (epoch {good_epoch}) stays in {ckpts.directory}.")
      if held is not None:
        states = _hold(states, held, held_runs)
      run_states = engine.unstack(states) if every and stop % every == 0 else None
      for done, run_metrics in enumerate(per_epoch, start=epoch + 1):
        for r, (run, m) in enumerate(zip(runs, run_metrics)):
          if diverged[r] is not None and done >= diverged[r]["epoch"]:
            continue
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
                                   "diverged": diverged, "data": trained_on,
                                   "runs": [dataclasses.asdict(run) for run in runs]})
        for ckpt, b in zip(best_ckpts, best):  # the best epochs before these are superseded
          ckpt.keep([b and b["epoch"]])
  finally:
    log.close()
    bar.close()
  final = engine.unstack(states)
  return [(None, d["epoch"]) if d is not None
          else (ckpt.restore(s, b["epoch"])[0], b["epoch"]) if oracle else (s, epochs)
          for s, d, b, ckpt in zip(final, diverged, best, best_ckpts or [None] * len(runs))]


def _train_data(config: ml_collections.ConfigDict, class_name: str) -> tuple[data.Source, dict]:
  """The training split and what the checkpoints record as trained on: the split's feature-cache
  key (`feature_cache.key_fields`). Every image's features are cached; each run draws its own
  `dataset.subsample` of them in the engine (`engine.image_subsets`)."""
  source = data.load_configured(config, class_name, "train")
  return source, feature_cache.key_fields(source, config)


def _note_data_change(class_name: str, class_dir: str, metas: list[dict | None], now: dict,
                      what: str, notes: list[str]) -> None:
  """Warns (log and results notes) when the models in `metas` were trained on other data."""
  recorded = next((m["data"] for m in metas if m and m.get("data")), None)
  if recorded is None:
    logging.info("%s: its models do not record their training data; not compared", class_name)
    return
  changes = feature_cache.data_changes(recorded, now)
  if changes:
    message = (f"{class_name}: {what} other data than the dataset holds now "
               f"({'; '.join(changes)} changed since it was trained); delete {class_dir} to "
               "train and evaluate it on the current data")
    logging.warning("%s", message)
    notes.append(message)


def decision(state: train.TrainState, train_split: feature_cache.Split, test_scores,
             test_labels, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """The run's decision thresholds and what they give on the test set (`report.DECISION_KEYS`).

  The thresholds come from the training images alone (`eval.threshold_quantile` of their scores
  and map maxima; no test label is used): the only normal images every class has without taking
  any from training or test. They were trained on, so a new normal image tends to score above
  them; the test FPR reported here measures how much. The F1-optimal test threshold beside it is
  selected on the test labels (optimistic).
  """
  scores, maps = inference.predict(state, train_split.features, config, mesh)
  thresholds = metrics_lib.normal_thresholds(scores, maps, config.eval.threshold_quantile)
  at = metrics_lib.decision_metrics(test_scores, test_labels, thresholds["threshold"])
  best, best_f1 = metrics_lib.f1_optimal_threshold(test_scores, test_labels)
  return {**thresholds, "threshold_quantile": config.eval.threshold_quantile,
          **{f"threshold_{k}": v for k, v in at.items()},
          "test_selected_threshold": best, "test_selected_f1": best_f1}


def run_class(config: ml_collections.ConfigDict, workdir: str, class_name: str, extractor,
              notes: list[str], mesh: jax.sharding.Mesh) -> list[dict]:
  """Prepare, extract, train (or load), evaluate and report one class: a results row per run.

  Resumable from wherever it stopped: training from its checkpoints, the rest again from the
  trained states (saves of what is saved already are kept). The class's `results.json` is written
  last and marks it finished: a rerun reads it back (and warns if the data changed since).
  """
  class_dir = os.path.join(workdir, f"{config.dataset.name}_{class_name}")
  results_path = os.path.join(class_dir, "results.json")
  runs = engine.runs_of(config)
  dirs = run_dirs(class_dir, runs)
  models = [checkpoint.Checkpointer(os.path.join(d, "model"), max_to_keep=None) for d in dirs]
  chash = checkpoint.config_hash(config)
  metas = [model.meta() for model in models]
  for meta, model in zip(metas, models):
    if meta:
      checkpoint.check_compatible(meta, chash, model.directory)
  if not config.eval.only and os.path.exists(results_path):
    logging.info("%s is finished (%s); delete it to train again", class_name, results_path)
    try:
      now = _train_data(config, class_name)[1]
    except data.DatasetError as e:
      message = f"{class_name}: could not check whether its data changed since training: {e}"
      logging.warning("%s", message)
      notes.append(message)
    else:
      _note_data_change(class_name, class_dir, metas, now,
                        f"its results ({results_path}) are of", notes)
    with open(results_path) as f:
      finished = json.load(f)
    notes += [n for n in finished["notes"] if n not in notes]
    return finished["rows"]

  t0 = time.time()
  test_src = data.load_configured(config, class_name, "test")
  train_src, trained_on = _train_data(config, class_name)
  if not config.eval.only:  # stop before any extraction when training cannot fit
    memory.check(config, len(train_src), features_lib.feature_shape(config), mesh, class_name)
  cropped = data.crop_losses(test_src).message()  # "" when the crop keeps every defect pixel
  if cropped:
    logging.warning("%s", cropped)
    notes.append(cropped)
  keep = heatmaps.heatmap_indices(len(test_src), config.eval.heatmaps)
  features_dir = fileio.features_dir()
  test = feature_cache.load_or_extract(extractor, test_src, config, keep,
                                       f"{class_name} test features", directory=features_dir)
  # Every training image: to train (each run draws its own dataset.subsample of them in the
  # engine), and for every run's decision threshold (eval.only too).
  train_split = feature_cache.load_or_extract(
      extractor, train_src, config, np.zeros(0, int), f"{class_name} train features",
      directory=features_dir)
  if config.eval.only:
    # Runs that diverged have no model: the training checkpoints say so.
    ckpt_meta = checkpoint.Checkpointer(os.path.join(class_dir, "checkpoints")).meta() or {}
    diverged = ckpt_meta.get("diverged") or [None] * len(runs)
    missing = [model.directory for model, meta, d in zip(models, metas, diverged)
               if meta is None and d is None]
    if missing:
      raise FileNotFoundError(f"eval.only: no trained model in {missing[0]}; train first "
                              "(the same command without --config.eval.only)")
    _note_data_change(class_name, class_dir, metas, trained_on, "its models are trained on",
                      notes)
    template = engine.unstack(engine.state_template(config, runs[:1], test.features.shape))[0]
    trained = [(None, d["epoch"]) if d is not None else (model.restore(template)[0], meta["epoch"])
               for model, meta, d in zip(models, metas, diverged)]
  else:
    trained = train_runs(config, class_dir, train_split, test, runs, mesh, trained_on)
    for model, (state, epoch) in zip(models, trained):
      if state is not None:
        model.save(epoch, state, {"config_hash": chash, "epoch": epoch, "data": trained_on})
        model.keep([epoch])

  if len(runs) > 1:
    notes.append(f"{class_name}: {len(runs)} runs trained together; wall_time_s = the class's / R")
  if config.eval.selection == "test_oracle":
    notes.append("epoch: epochs trained (1-based); the reference's log prints the 0-based loop "
                 "index of the same epoch, i.e. epoch - 1")
  reported = [state for state, _ in trained if state is not None]
  images_per_s = None
  if reported:
    # Throughput of inference alone (backbone, heads, maps) on one batch, after compilation.
    bs = config.eval.batch_size  # each process decodes only its rows of the batch
    images = next(data.batches(test_src, bs, rows=sharding.example_rows(mesh, bs), prefetch=0))
    images_per_s = inference.images_per_second(extractor, reported[0], images["image"], bs,
                                               config, mesh)
  rows = []
  for r, (run, run_dir, (state, epoch)) in enumerate(zip(runs, dirs, trained)):
    row = {"dataset": config.dataset.name, "class": class_name, "seed": run.seed}
    if state is None:
      note = (f"{class_name}{f' {run.name}' if len(runs) > 1 else ''}: diverged at epoch {epoch} "
              "(non-finite training metrics), not evaluated (metrics null); its last good state "
              "stays in the class's checkpoints/. Try a lower optim.lr / optim.dsc_lr")
      notes.append(note)
      rows.append({**row, **dict.fromkeys(report.METRIC_KEYS),
                   "pro_variant": config.eval.pro_variant, "epoch": None,
                   "selection": config.eval.selection, "images_per_s": None, "run": r,
                   "alpha": run.k, "diverged_epoch": epoch})
      continue
    scores, maps = inference.predict(state, test.features, config, mesh)
    result = metrics_lib.compute_all(scores, test.labels, maps, test.masks,
                                     config.eval.pro_variant)
    notes += [n for n in (f"{class_name}: {n}" for n in result.pop("notes")) if n not in notes]
    if len(keep) and jax.process_index() == 0:
      masks = None if test.masks is None else test.masks[keep]
      heatmaps.save_heatmaps(os.path.join(run_dir, "heatmaps"), test.images, masks, maps[keep],
                             [test.names[i] for i in keep], scores[keep], limit=-1,
                             value_range=(float(maps.min()), float(maps.max())))
    rows.append({**row, **result, "epoch": epoch, "selection": config.eval.selection,
                 "images_per_s": images_per_s, "run": r, "alpha": run.k,
                 **decision(state, train_split, scores, test.labels, config, mesh)})
  for row in rows:  # the class's time, shared by its runs
    row["wall_time_s"] = (time.time() - t0) / len(runs)
  if jax.process_index() == 0:
    # The reported evaluation joins the curves when training did not evaluate that epoch.
    curves.log_evaluation(class_dir, dirs, [
        {"epoch": row["epoch"], "run": row["run"], "seed": row["seed"], "alpha": row["alpha"],
         **{f"test_{key}": row[key] for key in report.METRIC_KEYS}}
        for row in rows if row.get("diverged_epoch") is None])
    # Last: it marks the class finished.
    report.write_results(class_dir, rows, config.eval.selection, notes, files=("json",),
                         echo=False)
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured class; writes `<workdir>/results.{csv,json,md}`; returns results.json.

  Under `srun` with several tasks the processes have joined first (`main.py`:
  `sharding.initialize_distributed`); all devices of all processes form one mesh.
  """
  config_base.validate(config)
  if config.dataset.name == "demo":
    demo_data.make_demo_dataset(data.source_of(config)[1])
  # Bad data or an unwritable workdir fail here, before anything is written.
  class_names = data.class_names(config)
  data.check_sources(config, class_names)
  main_process = jax.process_index() == 0
  if main_process:  # the writer of results; the other processes write only orbax's shares there
    fileio.check_writable(workdir, "--workdir")
    fileio.atomic_write(os.path.join(workdir, "config.json"),
                        config.to_json_best_effort(indent=2))
  mesh = engine.mesh_of(config)
  notes = []
  if config.backbone.weights == "random":
    notes.append(f"backbone weights are random (seed {config.backbone.seed}): the numbers are "
                 "not meaningful")
  extractor = features_lib.extractor_of(config, mesh)
  rows = []
  for class_name in class_names:
    rows += run_class(config, workdir, class_name, extractor, notes, mesh)
  results = None
  if rows:
    results = report.write_results(workdir, rows, config.eval.selection, notes,
                                   files=("json", "csv", "md") if main_process else (),
                                   echo=main_process)
  diverged = [f"{r['class']} seed {r['seed']} alpha {r['alpha']:g} at epoch {r['diverged_epoch']}"
              for r in rows if r.get("diverged_epoch") is not None]
  if diverged:  # after the results: the other runs are reported
    raise NonFiniteLossError(
        f"{len(diverged)} run(s) diverged (non-finite training metrics): {'; '.join(diverged)}. "
        f"The other runs' results are in {workdir}/results.*; try a lower optim.lr / "
        "optim.dsc_lr")
  return results
