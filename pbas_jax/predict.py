r"""Scores a folder of unlabelled images: scores.csv with a decision per image, heatmap panels and
defect masks.

  python -m pbas_jax.predict --workdir=runs/mvtec --class_name=bottle --images=/data/new_bottles
  python -m pbas_jax.predict --detector=runs/mvtec/export/mvtec_bottle.onnx --images=/data/new

With `--workdir` and `--class_name`: every trained run of the class, in JAX (`trained`). With
`--detector`: an ONNX file written by `pbas_jax.export`, on onnxruntime alone (`deploy`): this
path imports neither JAX nor the training code, so it runs where only onnxruntime, numpy and
pillow are installed. Both preprocess as training did, skip (and list, in the log and the CSV) an
image they cannot read, and write the same files; the command fails only when no image could be
scored.
"""
import os
import sys

from absl import app
from absl import flags

from pbas_jax import cli
from pbas_jax import deploy

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by pbas_jax.main.")
_CLASS = flags.DEFINE_string("class_name", None, "Class whose model scores the images.")
_DETECTOR = flags.DEFINE_string("detector", None,
                                "An .onnx file of pbas_jax.export (instead of --workdir).")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to score.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Output folder; default <workdir>/<class_name>_predict, or "
    "<detector name>_predict beside the detector.")
_HEATMAPS = flags.DEFINE_integer("heatmaps", -1, "Heatmap panels to write (-1 = all).")
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "Image score above which an image is anomalous; default the model's own "
    "(its JSON, or the class's results.json).")
_PIXEL_THRESHOLD = flags.DEFINE_float(
    "pixel_threshold", None, "Map value above which a pixel is in the defect mask; default the "
    "model's own.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if bool(_DETECTOR.value) == bool(_WORKDIR.value or _CLASS.value):
    raise app.UsageError("give either --detector=<file>.onnx, or --workdir and --class_name")
  thresholds = dict(heatmaps=_HEATMAPS.value, threshold=_THRESHOLD.value,
                    pixel_threshold=_PIXEL_THRESHOLD.value)
  try:
    output, (names, runs, skipped) = _predict(thresholds)
  except deploy.NothingScoredError as e:
    sys.exit(f"error: {e}")
  print("\n".join(deploy.summary(names, runs, skipped)))
  print(f"wrote {os.path.join(output, 'scores.csv')}")


def _predict(thresholds: dict):
  """(output folder, what `deploy.predict_folder` / `trained.predict_folder` return)."""
  if _DETECTOR.value:
    output = _OUTPUT.value or os.path.splitext(_DETECTOR.value)[0] + "_predict"
    return output, deploy.predict_folder(_DETECTOR.value, _IMAGES.value, output, **thresholds)
  if not (_WORKDIR.value and _CLASS.value):
    raise app.UsageError("--workdir and --class_name go together")
  # Imported here so that the --detector path never imports JAX.
  from pbas_jax import trained  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, f"{_CLASS.value}_predict")
  return output, trained.predict_folder(_WORKDIR.value, _CLASS.value, _IMAGES.value, output,
                                        **thresholds)


if __name__ == "__main__":
  flags.mark_flags_as_required(["images"])
  app.run(main)
