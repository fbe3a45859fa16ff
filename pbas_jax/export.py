r"""Exports a trained class for deployment: per trained run, one ONNX file holding the whole
detector and a JSON beside it (`deploy.describe`).

  python -m pbas_jax.export --workdir=runs/mvtec --class_name=bottle

writes `<workdir>/export/<dataset>_<class>.onnx` and `.json` (one pair per run, named
`<dataset>_<class>_<run>` when several runs trained together). The graph is the evaluation's
inference, traced once by jax2onnx (the `onnx` extra): images (B, S, S, 3), any B -> backbone ->
`features.patch_features` -> `train.score_patches` -> `inference.scores_and_maps` -> image
scores (B,) and maps (B, S, S). Each graph is run on onnxruntime and compared with JAX on a
random batch before it is written (`check`). `pbas_jax.predict --detector=<file>.onnx` runs it.
"""
import contextlib
import json
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from pbas_jax import backbones
from pbas_jax import checkpoint
from pbas_jax import deploy
from pbas_jax import features as features_lib
from pbas_jax import fileio
from pbas_jax import inference
from pbas_jax import train
from pbas_jax import trained

# jax2onnx 0.17's optimizer pass `remove_redundant_transpose_pairs` rewires a value that feeds two
# transposes (a ResNet Bottleneck's input feeds its conv1 and its downsample conv) so that a
# residual Add gets operands of different layouts, and onnxruntime refuses the graph
# ("ShapeInferenceError: Incompatible dimensions"; resnet50 and wide_resnet50_2, not resnet18 or
# EfficientNet-Lite0). Export runs without it (onnxruntime removes redundant transposes itself
# when it loads the graph); `check` compares every export with JAX whatever the version does.
_BROKEN_PASSES = ("remove_redundant_transpose_pairs",)
# Largest |onnxruntime - JAX| / max |JAX| `check` accepts: float32 rounding of the same operations
# in another order (measured: ~1e-6).
RTOL = 1e-4


class ExportError(RuntimeError):
  """The ONNX graph does not compute what the package computes."""


_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by pbas_jax.main.")
_CLASS = flags.DEFINE_string("class_name", None, "Class to export.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder; default <workdir>/export.")


def detector_fn(config, state: train.TrainState, variables):
  """`images (B, S, S, 3) -> (scores (B,), maps (B, S, S))` of one trained run: the extractor's
  and the evaluation's functions composed, with the backbone's variables and the run's state as
  constants."""
  b, size = config.backbone, config.dataset.image_size
  module = backbones.create(b.name, tuple(b.layers))

  def detect(images):
    features = features_lib.patch_features(module.apply(variables, images), b.patch_size,
                                           b.pretrain_dim, b.target_dim)
    patch_scores = train.score_patches(state, features, config.model.scoring,
                                       config.model.center_metric)
    return inference.scores_and_maps(patch_scores, size, float(config.eval.smoothing_sigma))

  return detect


@contextlib.contextmanager
def _without_broken_passes():
  from jax2onnx.converter import ir_optimizations  # pylint: disable=g-import-not-at-top
  passes = getattr(ir_optimizations, "_OPTIMIZER_PASSES", None)
  if passes is None:  # another jax2onnx layout: `check` still guards the result
    yield
    return
  ir_optimizations._OPTIMIZER_PASSES = tuple(  # pylint: disable=protected-access
      p for p in passes if getattr(p, "name", None) not in _BROKEN_PASSES)
  try:
    yield
  finally:
    ir_optimizations._OPTIMIZER_PASSES = passes  # pylint: disable=protected-access


def to_onnx(detect, size: int, name: str) -> bytes:
  """The serialized ONNX model of `detect` (`detector_fn`) for (B, size, size, 3) images, any B."""
  import jax2onnx  # pylint: disable=g-import-not-at-top  (the `onnx` extra; only here)
  with _without_broken_passes():
    model = jax2onnx.to_onnx(detect, [("B", size, size, 3)], model_name=name,
                             input_names=[deploy.INPUT], output_names=list(deploy.OUTPUTS))
  return model.SerializeToString()


def check(model: bytes, detect, size: int, batch: int = 2) -> float:
  """Runs the ONNX model on onnxruntime and `detect` in JAX on the same random batch; returns
  the largest relative difference of scores and maps, raising `ExportError` above `RTOL`."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # as deploy.Detector
  session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
  got = session.run(list(deploy.OUTPUTS), {deploy.INPUT: images})
  want = jax.jit(detect)(images)
  error = max(float(np.abs(g - np.asarray(w)).max() / max(np.abs(np.asarray(w)).max(), 1e-30))
              for g, w in zip(got, want))
  if not error <= RTOL:
    raise ExportError(f"the exported graph's outputs differ from JAX's by {error:.2e} (relative, "
                      f"more than {RTOL:g}): not written. A jax2onnx version issue: try "
                      "jax2onnx 0.17.1")
  return error


def export_class(workdir: str, class_name: str, output: str | None = None) -> list[str]:
  """Writes the ONNX file and JSON of every trained run of the class; returns the ONNX paths."""
  config, runs = trained.load(workdir, class_name)
  output = output or os.path.join(workdir, "export")
  b = config.backbone
  variables = backbones.load_variables(b.name, b.weights, seed=b.seed,
                                       cache_dir=b.cache_dir or None)
  backbone = {"name": b.name, "weights": b.weights, "seed": b.seed, "layers": list(b.layers),
              "weights_sha256": backbones.weights_sha256(b.name, b.weights, seed=b.seed,
                                                         cache_dir=b.cache_dir or None)}
  geometry = trained.geometry(config, class_name)
  stem = f"{config.dataset.name}_{class_name}"
  paths = []
  for r in runs:
    name = stem if len(runs) == 1 else f"{stem}_{r.name}"
    path = os.path.join(output, f"{name}.onnx")
    logging.info("%s %s: exporting to %s", class_name, r.name, path)
    detect = detector_fn(config, r.state, variables)
    model = to_onnx(detect, geometry.size, name)
    error = check(model, detect, geometry.size)
    logging.info("%s %s: onnxruntime equals JAX to %.1e (relative) on a random batch",
                 class_name, r.name, error)
    fileio.atomic_write(path, model)
    meta = deploy.describe(
        geometry=geometry, backbone=backbone, dataset=config.dataset.name,
        class_name=class_name, run={"name": r.name, "seed": r.run.seed, "alpha": r.run.k},
        epoch=r.epoch, config_hash=checkpoint.config_hash(config), decision=r.decision,
        onnx_file=os.path.basename(path))
    fileio.atomic_write(deploy.json_path(path), json.dumps(meta, indent=2) + "\n")
    paths.append(path)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # onnx_ir warns, once per shape constant, that it does not write shape annotations it cannot
  # type; the graph is complete without them (onnxruntime infers them).
  std_logging.getLogger("onnx_ir.serde").setLevel(std_logging.ERROR)
  for path in export_class(_WORKDIR.value, _CLASS.value, _OUTPUT.value):
    print(f"wrote {path} and {deploy.json_path(path)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "class_name"])
  app.run(main)
