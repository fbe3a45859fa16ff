"""Datasets: TFDS builders (MVTec AD, VisA, MPDD, users' folders), preprocessing, batching.

`data.<name>` imports the submodule that defines `<name>` on first use (PEP 562), so importing
`pbas_jax.data.preprocess` alone (numpy and PIL: what `pbas_jax.deploy` runs on, without JAX or
TFDS) does not import the builders.
"""
import importlib

_EXPORTS = {
    "builders": ("DATASETS", "classes", "prepare"),
    "configured": ("check_sources", "class_names", "data_dir", "load_configured", "source_of"),
    "loader": ("CropReport", "Source", "batches", "crop_losses", "load_split",
               "subsample_indices"),
    "preprocess": ("DatasetError", "DatasetNotFoundError", "Geometry", "IMAGE_EXTENSIONS",
                   "IMAGENET_MEAN", "IMAGENET_STD", "MASK_MODES", "RESIZE_MODES", "geometry",
                   "image_files", "load_image"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted({*globals(), *__all__})
