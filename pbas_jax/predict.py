r"""Scores a folder of unlabelled images with a trained class: scores.csv plus heatmap panels.

  python -m pbas_jax.predict --workdir=runs/mvtec --class_name=bottle --images=/data/new_bottles

Reads the run's `config.json` and the class's `model/` checkpoint (written by `pbas_jax.main`).
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
from pbas_jax import data
from pbas_jax import experiment
from pbas_jax import fileio
from pbas_jax import heatmaps as heatmaps_lib
from pbas_jax import inference
from pbas_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by pbas_jax.main.")
_CLASS = flags.DEFINE_string("class_name", None, "Class whose model scores the images.")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to score.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder; default <workdir>/<class_name>_predict.")
_HEATMAPS = flags.DEFINE_integer("heatmaps", -1, "Heatmap panels to write (-1 = all).")


def predict_folder(workdir: str, class_name: str, image_dir: str, output: str,
                   heatmaps: int = -1) -> list[tuple[str, float]]:
  """Scores every image file of `image_dir`; writes `scores.csv` and heatmaps to `output`."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a run directory of "
                            "pbas_jax.main")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  class_dir = os.path.join(workdir, f"{config.dataset.name}_{class_name}")
  model = checkpoint.Checkpointer(os.path.join(class_dir, "model"), max_to_keep=1)
  if model.latest_epoch() is None:
    raise FileNotFoundError(f"no trained model in {model.directory}: train class {class_name} "
                            "with pbas_jax.main first")
  files = [str(p) for p in data.image_files(image_dir)] if os.path.isdir(image_dir) else []
  if not files:
    raise FileNotFoundError(f"no image files ({', '.join(data.IMAGE_EXTENSIONS)}) in {image_dir}")

  size = config.dataset.image_size
  # As training preprocessed; runs from before resize_mode existed cropped.
  geometry = data.geometry(config.dataset.name, class_name, size, config.dataset.resize,
                           config.dataset.get("resize_mode", "crop"))
  extractor = experiment.make_extractor(config)
  state = None
  images, scores, maps = [], [], []
  bs = config.eval.batch_size
  for start in range(0, len(files), bs):
    batch = np.stack([data.load_image(p, geometry) for p in files[start:start + bs]])
    feats = extractor(batch)
    if state is None:
      state, _ = model.restore(experiment.state_template(config, feats.shape))
    patch = train.score_patches(state, feats, config.model.scoring, config.model.center_metric)
    s, m = inference.scores_and_maps(patch, size, config.eval.smoothing_sigma)
    scores.append(np.asarray(s))
    maps.append(np.asarray(m))
    if heatmaps < 0 or start < heatmaps:
      images.append(batch)
  scores, maps = np.concatenate(scores), np.concatenate(maps)
  names = [os.path.basename(p) for p in files]

  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["file", "score"])
  writer.writerows((n, f"{s:.6f}") for n, s in zip(names, scores))
  fileio.atomic_write(os.path.join(output, "scores.csv"), buf.getvalue())
  if heatmaps:
    kept = np.concatenate(images)
    count = len(kept) if heatmaps < 0 else min(heatmaps, len(kept))
    heatmaps_lib.save_heatmaps(os.path.join(output, "heatmaps"), kept[:count], None,
                               maps[:count], names[:count], scores[:count], limit=-1,
                               value_range=(float(maps.min()), float(maps.max())))
  return list(zip(names, scores.tolist()))


def main(argv):
  del argv
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, f"{_CLASS.value}_predict")
  results = predict_folder(_WORKDIR.value, _CLASS.value, _IMAGES.value, output, _HEATMAPS.value)
  for name, score in results:
    print(f"{score:.4f}  {name}")
  print(f"wrote {os.path.join(output, 'scores.csv')}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "class_name", "images"])
  app.run(main)
