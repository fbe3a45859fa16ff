r"""Exports a trained class for deployment: per trained run, one ONNX file holding the whole
detector and a JSON beside it (`deploy.describe`).

  python -m pbas_jax.export --workdir=runs/mvtec --class_name=bottle

writes `<workdir>/export/<dataset>_<class>.onnx` and `.json` (one pair per run, named
`<dataset>_<class>_<run>` when several runs trained together). The graph is the evaluation's
inference, traced once by jax2onnx (the `onnx` extra): images (B, S, S, 3), any B -> backbone ->
`features.patch_features` -> `train.score_patches` -> `inference.scores_and_maps` -> image
scores (B,) and maps (B, S, S). `pbas_jax.predict --detector=<file>.onnx` runs it on onnxruntime.
"""
import json
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging

from pbas_jax import backbones
from pbas_jax import checkpoint
from pbas_jax import deploy
from pbas_jax import features as features_lib
from pbas_jax import fileio
from pbas_jax import inference
from pbas_jax import train
from pbas_jax import trained

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


def export_class(workdir: str, class_name: str, output: str | None = None) -> list[str]:
  """Writes the ONNX file and JSON of every trained run of the class; returns the ONNX paths."""
  import jax2onnx  # pylint: disable=g-import-not-at-top  (the `onnx` extra; only here)
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
    model = jax2onnx.to_onnx(detector_fn(config, r.state, variables),
                             [("B", geometry.size, geometry.size, 3)], model_name=name,
                             input_names=[deploy.INPUT], output_names=list(deploy.OUTPUTS))
    fileio.atomic_write(path, model.SerializeToString())
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
