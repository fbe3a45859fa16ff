r"""Inference from images (images/s): the JAX path and the exported ONNX detector on onnxruntime.

  python benchmarks/onnx_inference.py [--root $PBAS_DATA/mpdd] [--class_name metal_plate]
      [--images N] [--image_size 288] [--backbone wide_resnet50_2 --layers layer2,layer3]
      [--batch_size 8] [--runs 3] [--provider CPUExecutionProvider]

Same images, batch and model on both sides (random backbone weights, freshly initialized heads:
speed does not depend on their values). JAX: what `pbas_jax.predict --workdir` runs, the jitted
extractor then `inference.predict` (as benchmarks/inference.py). ONNX: the graph
`pbas_jax.export` writes for the same state (`export.detector_fn`), run by onnxruntime with
`--provider` (default: CUDA when onnxruntime has it, else CPU) on the same fixed-size batches
(`deploy.Detector`'s calls). Export time is printed, not counted. Each side is timed `--runs`
times over all the images after a warm-up batch; medians are reported, with the agreement of the
first batch's scores and maps.

Prints `uptime` at the start and the end, the figures, and one JSON line last.
"""
import argparse
import time

import jax
import numpy as np
import onnxruntime

import inference as inference_benchmark
import side_by_side
from pbas_jax import deploy
from pbas_jax import export
from pbas_jax import features as features_lib
from pbas_jax import sharding
from pbas_jax import train


def onnx_pass(session, images: np.ndarray, batch_size: int) -> tuple[float, tuple]:
  """Seconds of onnxruntime over `images` in padded batches, and the first batch's output."""
  t = time.perf_counter()
  out = [session.run(list(deploy.OUTPUTS), {deploy.INPUT: batch})
         for batch, _ in side_by_side.padded_batches(images, batch_size)]
  return time.perf_counter() - t, out[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  side_by_side.add_args(parser)
  parser.add_argument("--runs", type=int, default=3, help="timed passes over the images per side")
  parser.add_argument("--provider", default=None, help="onnxruntime execution provider")
  args = parser.parse_args()
  load_start = side_by_side.load()
  print(f"start: {load_start}")

  config = side_by_side.config_from(args)
  images, _ = side_by_side.load_images(args, "test")
  n, bs, b = len(images), args.batch_size, config.backbone
  variables = side_by_side.backbone(args, False)[0]
  mesh = sharding.make_mesh()
  extractor = features_lib.make_extractor(b.name, variables, tuple(b.layers), b.patch_size,
                                          b.pretrain_dim, b.target_dim, mesh=mesh)
  state = train.create_train_state(config, jax.random.key(0), b.target_dim)
  inference_benchmark.pbas_jax_pass(extractor, state, images[:bs], config, mesh)  # compiles
  passes = [inference_benchmark.pbas_jax_pass(extractor, state, images, config, mesh)
            for _ in range(args.runs)]
  jax_s = side_by_side.median([p[0] + p[1] for p in passes])

  t = time.perf_counter()
  model = export.to_onnx(export.detector_fn(config, state, variables), args.image_size,
                         "benchmark")
  export_s = time.perf_counter() - t
  available = onnxruntime.get_available_providers()
  provider = args.provider or ("CUDAExecutionProvider" if "CUDAExecutionProvider" in available
                               else "CPUExecutionProvider")
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # as deploy.Detector
  session = onnxruntime.InferenceSession(model, options,
                                         providers=[provider])
  onnx_pass(session, images[:bs], bs)  # warm-up
  onnx_passes = [onnx_pass(session, images, bs) for _ in range(args.runs)]
  onnx_s = side_by_side.median([p[0] for p in onnx_passes])
  (jax_scores, jax_maps), (onnx_scores, onnx_maps) = passes[0][2], onnx_passes[0][1]
  valid = len(images[:bs])
  result = {
      "benchmark": "onnx_inference", "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "onnxruntime": onnxruntime.__version__,
      "provider": session.get_providers()[0], "dataset": args.dataset, "class": args.class_name,
      "images": n, "image_size": args.image_size, "backbone": b.name, "layers": list(b.layers),
      "dims": b.target_dim, "batch_size": bs, "runs": args.runs,
      "export_s": round(export_s, 1),
      "jax_s": round(jax_s, 3), "jax_images_per_s": round(n / jax_s, 2),
      "onnx_s": round(onnx_s, 3), "onnx_images_per_s": round(n / onnx_s, 2),
      "onnx_speedup": round(jax_s / onnx_s, 2),
      "scores_relative_difference": side_by_side.relative_difference(
          onnx_scores[:valid], jax_scores),
      "maps_relative_difference": side_by_side.relative_difference(onnx_maps[:valid], jax_maps),
  }
  print(f"JAX ({result['device']}): {n / jax_s:.2f} images/s; onnxruntime "
        f"({result['provider']}): {n / onnx_s:.2f} images/s; ratio {result['onnx_speedup']}x "
        f"({n} images, batch {bs}; export took {export_s:.0f} s)")
  print(f"first batch: scores agree to {result['scores_relative_difference']:.1e}, maps to "
        f"{result['maps_relative_difference']:.1e} relative")
  side_by_side.finish(result, argparse.Namespace(), load_start)  # no torch side to explain


if __name__ == "__main__":
  main()
