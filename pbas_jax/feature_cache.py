"""Backbone patch features of a split, extracted once (`extract_split`)."""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from pbas_jax import data
from pbas_jax import sharding


@dataclasses.dataclass
class Split:
  """One split of a class, with its backbone patch features computed once.

  features: (N, H, W, D) in the cache dtype; labels: (N,); masks: (N, S, S) or None;
  names: N source file names; images: the first few preprocessed images (for heatmap panels).
  """
  features: Any
  labels: np.ndarray
  masks: np.ndarray | None
  names: list[str]
  defect_types: list[str]
  images: np.ndarray



def _store(x: jax.Array, config: ml_collections.ConfigDict) -> Any:
  """Keeps one batch of features in the cache dtype, on device or on host."""
  x = x.astype(jnp.bfloat16 if config.train.cache_dtype == "bfloat16" else jnp.float32)
  return sharding.to_host(x) if config.train.cache_device == "host" else x


def extract_split(extractor, source: data.Source, config: ml_collections.ConfigDict,
                  keep: np.ndarray, desc: str, indices: np.ndarray | None = None) -> Split:
  """Runs the frozen backbone once over `source` (ordered) and keeps its patch features.

  `keep` are the indices of the images kept (preprocessed) for heatmap panels; `indices` restricts
  the split to a subset (training-set subsampling).
  """
  feats, labels, masks, names, types, images = [], [], [], [], [], []
  bs = config.eval.batch_size
  count = len(source) if indices is None else len(indices)
  for batch in tqdm.tqdm(data.batches(source, bs, indices=indices), desc=desc, unit="batch",
                         total=-(-count // bs), leave=False):
    valid = int(batch["valid"].sum())
    feats.append(_store(extractor(batch["image"])[:valid], config))
    labels.append(batch["label"][:valid])
    masks.append(batch["mask"][:valid])
    names += [f"{t}/{os.path.splitext(os.path.basename(f))[0]}"
              for t, f in zip(batch["defect_type"][:valid], batch["filename"][:valid])]
    types += list(batch["defect_type"][:valid])
    images.append(batch["image"][:valid][np.isin(batch["index"][:valid], keep)])
  concat = np.concatenate if config.train.cache_device == "host" else jnp.concatenate
  return Split(features=concat(feats), labels=np.concatenate(labels),
               masks=np.concatenate(masks) if source.has_masks else None,
               names=names, defect_types=types, images=np.concatenate(images))

