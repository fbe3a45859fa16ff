"""The dataset a config names: where its raw and prepared files are, its classes, its splits.

`dataset.name=demo` is a folder dataset generated under the cache folder on first use.
"""
import os

import ml_collections

from pbas_jax import fileio
from pbas_jax.data import builders
from pbas_jax.data import loader


def source_of(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(builder, raw root) of the configured dataset; `demo` is a folder dataset made on the spot."""
  if config.dataset.name == "demo":
    return "folder", config.dataset.root or os.path.join(fileio.cache_dir(), "demo")
  return config.dataset.name, config.dataset.root


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The configured classes, or every class of the dataset when `dataset.classes` is empty."""
  listed = [c.strip() for c in str(config.dataset.classes).split(",") if c.strip()]
  builder, root = source_of(config)
  return listed or builders.classes(builder, root or None)


def check_sources(config: ml_collections.ConfigDict, classes: list[str]) -> None:
  """Checks the raw layout of every class (`builders.scan`, file names only) when
  `dataset.root` is set; raises DatasetError naming the problem."""
  builder, root = source_of(config)
  if root:
    for class_name in classes:
      builders.scan(builder, root, class_name)


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where prepared datasets live: `dataset.data_dir`, else `<cache folder>/tfds`."""
  return config.dataset.data_dir or os.path.join(fileio.cache_dir(), "tfds")


def load_configured(config: ml_collections.ConfigDict, class_name: str,
                    split: str) -> loader.Source:
  """`loader.load_split` of `class_name` with the config's dataset, geometry and mask rule."""
  builder, root = source_of(config)
  d = config.dataset
  return loader.load_split(builder, root, class_name, split, data_dir=data_dir(config),
                           image_size=d.image_size, resize=d.resize, resize_mode=d.resize_mode,
                           mask_mode=d.mask_mode)
