r"""Scores a folder of unlabelled images with a trained class: scores.csv plus heatmap panels.

  python -m pbas_jax.predict --workdir=runs/mvtec --class_name=bottle --images=/data/new_bottles

Reads the run's `config.json` and the class's trained models (`<class>/model`, or
`<class>/<run>/model` for runs trained together), written by `pbas_jax.main`.
"""
import csv
import io
import json
import os

from absl import app
from absl import flags
import ml_collections
import numpy as np

from pbas_jax import checkpoint
from pbas_jax import cli
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import experiment
from pbas_jax import features as features_lib
from pbas_jax import fileio
from pbas_jax import heatmaps as heatmaps_lib
from pbas_jax import inference
from pbas_jax import sharding

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by pbas_jax.main.")
_CLASS = flags.DEFINE_string("class_name", None, "Class whose model scores the images.")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to score.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder; default <workdir>/<class_name>_predict.")
_HEATMAPS = flags.DEFINE_integer("heatmaps", -1, "Heatmap panels to write (-1 = all).")


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
  class_dir = os.path.join(workdir, f"{config.dataset.name}_{class_name}")
  runs = engine.runs_of(config)
  dirs = {run.name: os.path.join(d, "model")
          for run, d in zip(runs, experiment.run_dirs(class_dir, runs))}
  found = {name: d for name, d in dirs.items() if os.path.isdir(d) and os.listdir(d)}
  if not found:
    raise FileNotFoundError(f"no trained model of class {class_name} in {', '.join(dirs.values())}"
                            f": train it with pbas_jax.main first (same --workdir)")
  return config, found


def predict_folder(workdir: str, class_name: str, image_dir: str, output: str,
                   heatmaps: int = -1) -> list[tuple[str, float]]:
  """Scores every image file of `image_dir` with each trained run of the class.

  Writes `scores.csv` (one score column per run) and heatmap panels (`heatmaps/`, per run in
  `heatmaps/<run>/` when the class has several) to `output`. Images are preprocessed as in
  training and scored by the same inference code as the evaluation, on all devices.

  Returns:
    (file name, score) pairs of the first run.
  """
  config, models = model_dirs(workdir, class_name)
  files = [str(p) for p in data.image_files(image_dir)] if os.path.isdir(image_dir) else []
  if not files:
    raise FileNotFoundError(f"no image files ({', '.join(data.IMAGE_EXTENSIONS)}) in {image_dir}")
  size = config.dataset.image_size
  # As training preprocessed; runs from before resize_mode existed cropped.
  geometry = data.geometry(config.dataset.name, class_name, size, config.dataset.resize,
                           config.dataset.get("resize_mode", "crop"))
  mesh = sharding.make_mesh()
  extractor = features_lib.extractor_of(config, mesh)
  names = [os.path.basename(p) for p in files]
  bs = config.eval.batch_size
  batches = [np.stack([data.load_image(p, geometry) for p in files[start:start + bs]])
             for start in range(0, len(files), bs)]
  features = [extractor(batch) for batch in batches]
  template = engine.unstack(engine.state_template(config, engine.runs_of(config)[:1],
                                                  features[0].shape))[0]
  columns = {}
  for run_name, model_dir in models.items():
    state, _ = checkpoint.Checkpointer(model_dir, max_to_keep=1).restore(template)
    scored = [inference.predict(state, f, config, mesh) for f in features]
    scores, maps = (np.concatenate(parts) for parts in zip(*scored))
    columns[run_name] = scores
    if heatmaps:
      count = len(files) if heatmaps < 0 else min(heatmaps, len(files))
      folder = os.path.join(output, "heatmaps", *([run_name] if len(models) > 1 else []))
      heatmaps_lib.save_heatmaps(folder, np.concatenate(batches)[:count], None, maps[:count],
                                 names[:count], scores[:count], limit=-1,
                                 value_range=(float(maps.min()), float(maps.max())))
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["file", *(["score"] if len(columns) == 1 else columns)])
  writer.writerows([n, *(f"{c[i]:.6f}" for c in columns.values())] for i, n in enumerate(names))
  fileio.atomic_write(os.path.join(output, "scores.csv"), buf.getvalue())
  return list(zip(names, next(iter(columns.values())).tolist()))


def main(argv):
  del argv
  cli.quiet_library_logs()
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, f"{_CLASS.value}_predict")
  results = predict_folder(_WORKDIR.value, _CLASS.value, _IMAGES.value, output, _HEATMAPS.value)
  for name, score in results:
    print(f"{score:.4f}  {name}")
  print(f"wrote {os.path.join(output, 'scores.csv')}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "class_name", "images"])
  app.run(main)
