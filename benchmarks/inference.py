r"""Inference from images (images/s): pbas_jax's extraction + scoring, and the reference's predict.

  python benchmarks/inference.py [--root $PBAS_DATA/mpdd] [--class_name metal_plate] [--images N]
      [--image_size 288] [--runs 3]

The published settings by default (288x288, batch 8, WideResNet50 layers 2+3, 1536 dims) on one
class's test images, random backbone weights and freshly initialized heads (speed does not depend
on their values; side_by_side.py says how both sides get the same ones).

pbas_jax, after compiling: the jitted extractor, then the main job's scoring (`inference.predict`:
per batch D's patch scores, image scores and the smoothed maps, fetched to the host); the two
parts are timed one after the other and summed.

Reference (when torch is installed, in this process, on the same images): per batch, the authors'
`_predict` (benchmarks/torch_reference.py): the whole torchvision forward, patch aggregation,
projector, discriminator, image score, bilinear upsampling and scipy's Gaussian filter per map.
Image decoding is left out on both sides. Each side is timed `--runs` times over all the images
(after one warm-up batch); medians are reported.

Prints `uptime` at the start and the end, the figures, and one JSON line last.
"""
import argparse
import time

import jax

import side_by_side
from pbas_jax import features as features_lib
from pbas_jax import inference
from pbas_jax import sharding
from pbas_jax import train


def pbas_jax_pass(extractor, state, images, config, mesh) -> tuple[float, float, tuple]:
  """Seconds of extraction and of scoring over `images`, and the first batch's (scores, maps)."""
  bs = config.eval.batch_size
  t = time.perf_counter()
  features = side_by_side.extract(extractor, images, bs)
  extract_s = time.perf_counter() - t
  t = time.perf_counter()
  scores, maps = inference.predict(state, features, config, mesh)  # the main job's scoring
  score_s = time.perf_counter() - t
  return extract_s, score_s, (scores[:bs], maps[:bs])


def reference_pass(reference, heads, torch_images, config, device) -> tuple[float, tuple]:
  """Seconds of the reference's predict over `torch_images`, and the first batch's output."""
  import torch_reference  # pylint: disable=g-import-not-at-top  (needs torch)
  b, bs = config.backbone, config.eval.batch_size
  side_by_side.sync(device)
  t = time.perf_counter()
  out = []
  for start in range(0, len(torch_images), bs):
    feats = torch_reference.patch_features(reference(torch_images[start:start + bs]),
                                           b.patch_size, b.pretrain_dim, b.target_dim)
    out.append(heads.predict(feats, config.dataset.image_size,
                             float(config.eval.smoothing_sigma)))
  side_by_side.sync(device)
  return time.perf_counter() - t, out[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  side_by_side.add_args(parser)
  parser.add_argument("--runs", type=int, default=3, help="timed passes over the images per side")
  args = parser.parse_args()
  load_start = side_by_side.load()
  print(f"start: {load_start}")

  config = side_by_side.config_from(args)
  with_reference = side_by_side.reference_wanted(args)
  images, _ = side_by_side.load_images(args, "test")
  n, bs = len(images), args.batch_size

  variables, reference, device = side_by_side.backbone(args, with_reference)
  b = config.backbone
  mesh = sharding.make_mesh()
  extractor = features_lib.make_extractor(b.name, variables, tuple(b.layers), b.patch_size,
                                          b.pretrain_dim, b.target_dim, mesh=mesh)
  state = train.create_train_state(config, jax.random.key(0), b.target_dim)
  pbas_jax_pass(extractor, state, images[:bs], config, mesh)  # compiles
  passes = [pbas_jax_pass(extractor, state, images, config, mesh) for _ in range(args.runs)]
  extract_s = side_by_side.median([p[0] for p in passes])
  score_s = side_by_side.median([p[1] for p in passes])
  total_s = side_by_side.median([p[0] + p[1] for p in passes])
  result = {
      "benchmark": "inference", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "dataset": args.dataset, "class": args.class_name, "images": n,
      "image_size": args.image_size, "backbone": b.name, "layers": list(b.layers),
      "dims": b.target_dim, "batch_size": bs, "runs": args.runs,
      "extraction_s": round(extract_s, 3), "scoring_s": round(score_s, 3),
      "total_s": round(total_s, 3), "images_per_s": round(n / total_s, 2), "reference": None,
  }
  print(f"pbas_jax: {n / total_s:.2f} images/s ({n} images: extraction {extract_s:.2f} s, "
        f"scoring and maps {score_s:.2f} s)")
  if with_reference:
    import torch_reference  # pylint: disable=g-import-not-at-top  (needs torch)
    params, stats = jax.device_get((state.params, state.batch_stats))
    heads = torch_reference.Heads(params, batch_stats=stats, device=device)
    torch_images = side_by_side.to_torch(images, device)
    reference_pass(reference, heads, torch_images[:bs], config, device)  # warm-up
    ref_passes = [reference_pass(reference, heads, torch_images, config, device)
                  for _ in range(args.runs)]
    ref_s = side_by_side.median([p[0] for p in ref_passes])
    (ours_scores, ours_maps), (ref_scores, ref_maps) = passes[0][2], ref_passes[0][1]
    result["reference"] = {
        "total_s": round(ref_s, 3), "images_per_s": round(n / ref_s, 2),
        **side_by_side.torch_setting(device),
        "scores_relative_difference": side_by_side.relative_difference(ours_scores, ref_scores),
        "maps_relative_difference": side_by_side.relative_difference(ours_maps, ref_maps)}
    result["speedup"] = round(ref_s / total_s, 2)
    print(f"reference (torch, {device}): {n / ref_s:.2f} images/s; first batch's scores agree to "
          f"{result['reference']['scores_relative_difference']:.1e}, maps to "
          f"{result['reference']['maps_relative_difference']:.1e} relative")
    print(f"ratio: pbas_jax images/s / reference images/s = {result['speedup']}x")
  side_by_side.finish(result, args, load_start)


if __name__ == "__main__":
  main()
