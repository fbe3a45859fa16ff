"""The memory plan of training one class: what each device holds, against what it has.

Checked before any extraction (`experiment.run_class`), so a class that cannot fit stops at once
with the settings that help, instead of failing after minutes of extraction.
"""
from absl import logging
import jax
import ml_collections
import numpy as np

from pbas_jax import engine
from pbas_jax import sharding

_FIX = ("--config.train.cache_dtype=bfloat16 (half the feature bytes), more devices (the cached "
        "features split over the mesh's data devices, train.mesh), or a smaller "
        "--config.dataset.image_size")


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_limit(mesh: jax.sharding.Mesh) -> int | None:
  """The memory of a device of `mesh` where the backend reports it (`bytes_limit`), else None."""
  try:
    stats = mesh.devices.flat[0].memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  return (stats or {}).get("bytes_limit")


def plan(config: ml_collections.ConfigDict, n_images: int, feature_shape: tuple[int, int, int],
         mesh: jax.sharding.Mesh) -> dict:
  """Bytes per device of training the runs of `config` on `mesh`.

  Args:
    n_images: training images (all cached; `dataset.subsample` draws from them per run).
    feature_shape: `(H, W, D)` of the patch features (`features.feature_shape`).

  Returns:
    `features_per_device`: the cached features' rows a device holds (`sharding.put_rows`);
    `centers_per_device`, `state_per_device`: the center banks and whole train states (centers
    included) of the runs a device holds; `step_working_set`: an estimate of a step's
    activations and gradients (the gathered batch, projected patches, their distances to every
    center, the discriminator's layers for true and synthetic patches, twice for the backward
    pass); `total`; `bytes_limit` (None where the backend does not report it).
  """
  runs = engine.runs_of(config)
  h, w, dim = feature_shape
  data, runs_per_device = mesh.shape[sharding.DATA], len(runs) // mesh.shape[sharding.RUNS]
  itemsize = 2 if config.train.cache_dtype == "bfloat16" else 4
  state = jax.eval_shape(lambda: engine.state_template(config, runs[:1], feature_shape))
  bs = config.dataset.batch_size
  rows = bs * h * w // (data if bs % data == 0 else 1)  # a run's patches on a device per step
  per_row = itemsize * dim + 4 * (3 * dim + h * w + 2 * config.model.disc_layers *
                                  config.model.disc_hidden)
  result = {
      "features_per_device": -(-n_images // data) * h * w * dim * itemsize,
      "centers_per_device": runs_per_device * h * w * dim * 4,
      "state_per_device": runs_per_device * _bytes(state),
      "step_working_set": runs_per_device * (2 * rows * per_row + 2 * _bytes(state.params)),
  }
  result["total"] = (result["features_per_device"] + result["state_per_device"] +
                     result["step_working_set"])
  result["bytes_limit"] = device_limit(mesh)
  return result


def check(config: ml_collections.ConfigDict, n_images: int, feature_shape: tuple[int, int, int],
          mesh: jax.sharding.Mesh, what: str) -> dict:
  """Logs `plan` for `what` (e.g. the class) and raises MemoryError, naming the settings that
  help, when its total exceeds a device's reported memory."""
  p = plan(config, n_images, feature_shape, mesh)
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  limit = p["bytes_limit"]
  logging.info(
      "%s: memory per device on a %s mesh: features %s (%d images of %s, %s), centers %s, train "
      "states %s, step working set ~%s; total ~%s of %s", what,
      "x".join(map(str, mesh.devices.shape)), gib(p["features_per_device"]), n_images,
      "x".join(map(str, feature_shape)), config.train.cache_dtype, gib(p["centers_per_device"]),
      gib(p["state_per_device"]), gib(p["step_working_set"]), gib(p["total"]),
      gib(limit) if limit else "(device memory not reported by the backend)")
  if limit and p["total"] > limit:
    raise MemoryError(
        f"{what}: training needs ~{gib(p['total'])} per device (cached features "
        f"{gib(p['features_per_device'])}, train states {gib(p['state_per_device'])}, step "
        f"~{gib(p['step_working_set'])}), the device has {gib(limit)}: use {_FIX}")
  return p
