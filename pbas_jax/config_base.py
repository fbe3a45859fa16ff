"""Defaults shared by every `configs/*.py` file: the settings of the published runs.

`configs/<dataset>.py` files start from `base_config()` and change only what differs. Every key a
user may override is declared here, so a misspelled override fails (the ConfigDict is locked by
`ml_collections.config_flags`).
"""
import importlib.util
import os
from typing import Any, Mapping

import ml_collections

from pbas_jax import center
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import feature_cache
from pbas_jax import losses
from pbas_jax import metrics
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax import synthesis
from pbas_jax import train


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "mvtec"          # mvtec | visa | mpdd | folder | demo
  c.dataset.root = ""               # raw data (manual dir); required except for `demo`
  c.dataset.classes = ""            # comma-separated; "" = all classes of the dataset
  c.dataset.data_dir = ""           # prepared: <data_dir>/<root>-<hash>/; "" = <cache>/tfds
  c.dataset.image_size = 288        # center-crop size
  c.dataset.resize = 288            # shorter side before the crop (toothbrush/wood rule applies)
  c.dataset.resize_mode = "auto"    # crop (reference: shorter side to resize, center crop) |
                                    # stretch (our addition: whole image to image_size square) |
                                    # auto: crop for mvtec/visa/mpdd, stretch for folder/demo
  c.dataset.mask_mode = "reference" # reference | binary (nearest-neighbour, > 0)
  c.dataset.subsample = 1.0         # fraction of the training set kept (Table VII)
  c.dataset.batch_size = 8

  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = "wide_resnet50_2"
  c.backbone.weights = "IMAGENET1K_V1"  # a converted weight id, a .safetensors file (torchvision
                                        # or timm names), hf-hub:<repo>, or "random"
  c.backbone.seed = 0                   # seed of "random" weights
  c.backbone.cache_dir = ""             # "" = $PBAS_JAX_CACHE or ~/.cache/pbas_jax
  c.backbone.layers = ("layer2", "layer3")
  c.backbone.patch_size = 3
  c.backbone.pretrain_dim = 1536
  c.backbone.target_dim = 1536

  c.model = ml_collections.ConfigDict()
  c.model.projector_layers = 1
  c.model.disc_layers = 2
  c.model.disc_hidden = 1024
  c.model.center_init = "alignment" # alignment | average | iterative | kmeans
  c.model.center_metric = "cosine"  # cosine | euclidean (matching during init and training)
  c.model.center_ema = 0.1          # beta: weight of the new batch mean
  c.model.kmeans_iters = 20
  c.model.synthesis = "ray"         # ray (AFS) | gaussian (SimpleNet noise)
  c.model.k = 0.25                  # anomaly degree alpha of Eq. 7 (reference code: 0.25)
  c.model.noise_std = 0.015
  c.model.rbo = True                # False: ABL alone (L_c only, no discriminator; Table V)
  c.model.scoring = "discriminator" # discriminator | center_distance (distance to nearest center)
  c.model.bce = "reference"         # reference (torch Sigmoid + BCELoss: loss and gradient) |
                                    # stable (our addition: softplus form, +-1/N up to the cap)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.dsc_lr = 2e-4
  c.optim.proj_weight_decay = 1e-5  # coupled L2 (Adam)
  c.optim.dsc_weight_decay = 1e-2   # decoupled (AdamW)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 640
  c.train.seed = 0
  c.train.cache_dtype = "float32"   # float32 | bfloat16 storage of cached features
  c.train.feature_cache = "auto"    # auto: keep extracted features on disk (<cache dir>/features)
                                    # and reuse them in later runs | off (pbas_jax option)
  c.train.checkpoint_every = 20
  c.train.compute_dtype = "float32" # float32 (reference) | bfloat16: operands of the heads'
                                    # matmuls (ours; parameters and sums stay float32)
  c.train.param_ema = 0.0           # ours, off: > 0 = per-step decay of averaged projector and
                                    # discriminator parameters, used for evaluation
  c.train.num_runs = 1              # runs trained together (vmapped): seeds from train.seed up
  c.train.k_values = ()             # model.k of runs trained together (vmapped), each with every
                                    # seed; () = (model.k,)
  c.train.mesh = "auto"             # devices of training, runs x data: auto (runs over
                                    # gcd(R, devices), the rest split batches) | 'RxD', e.g. '2x4'

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 0           # 0 = only after the last epoch
  c.eval.selection = "last"         # last | test_oracle (the reference's test-set selection)
  c.eval.pro_variant = "standard"   # standard (MVTec AUPRO) | reference (authors' code)
  c.eval.smoothing_sigma = 4.0
  c.eval.heatmaps = 20              # heatmap panels written per class (0 = none, -1 = all)
  c.eval.batch_size = 16
  c.eval.only = False               # evaluate a trained model from the workdir, no training
  # Ours: the decision threshold (predict's yes/no and defect masks) is this quantile of the
  # training images' scores (metrics.normal_thresholds); the five metrics do not use it.
  c.eval.threshold_quantile = 0.99

  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects, before anything runs, values the locked ConfigDict accepts by type but the method
  cannot use; each message names the setting and the fix. Allowed values come from the modules
  that own them."""
  choices = {
      "dataset.mask_mode": data.MASK_MODES,
      "dataset.resize_mode": data.RESIZE_MODES,
      "model.center_init": center.METHODS,
      "model.center_metric": center.METRICS,
      "model.synthesis": synthesis.SYNTHESES,
      "model.scoring": train.SCORINGS,
      "model.bce": losses.BCE_MODES,
      "train.cache_dtype": ("float32", "bfloat16"),
      "train.feature_cache": feature_cache.MODES,
      "train.compute_dtype": tuple(train.COMPUTE_DTYPES),
      "eval.selection": report.SELECTIONS,
      "eval.pro_variant": metrics.PRO_VARIANTS,
  }
  for key, allowed in choices.items():
    section, name = key.split(".")
    value = config[section][name]
    if value not in allowed:
      raise ValueError(f"--config.{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
  positive = ("dataset.image_size", "dataset.resize", "dataset.batch_size", "train.epochs",
              "train.checkpoint_every", "backbone.pretrain_dim", "backbone.target_dim",
              "backbone.patch_size", "eval.batch_size", "train.num_runs")
  for key in positive:
    section, name = key.split(".")
    if config[section][name] <= 0:
      raise ValueError(f"--config.{key} must be positive, got {config[section][name]}")
  sharding.parse_layout(config.train.mesh, len(engine.runs_of(config)))  # and repeated k_values
  if not config.model.rbo and config.model.scoring == "discriminator":
    raise ValueError("--config.model.rbo=False (ABL alone) trains no discriminator: set "
                     "--config.model.scoring=center_distance")
  if not 0 < config.dataset.subsample <= 1:
    raise ValueError(f"--config.dataset.subsample must be in (0, 1], got {config.dataset.subsample}")
  if not 0 <= config.train.param_ema < 1:
    raise ValueError(f"--config.train.param_ema={config.train.param_ema}: use 0 (off) or a decay "
                     "in (0, 1), e.g. 0.999")
  if not 0 < config.eval.threshold_quantile <= 1:
    raise ValueError(f"--config.eval.threshold_quantile={config.eval.threshold_quantile}: use a "
                     "value in (0, 1] (1 = the largest training image score)")
  if config.eval.every_epochs < 0:
    raise ValueError(f"--config.eval.every_epochs={config.eval.every_epochs}: use 0 (only after "
                     "the last epoch) or a positive interval")
  if config.eval.selection == "test_oracle" and config.eval.every_epochs > config.train.epochs:
    raise ValueError(
        f"--config.eval.selection=test_oracle picks the best evaluated epoch, but "
        f"--config.eval.every_epochs={config.eval.every_epochs} is larger than "
        f"--config.train.epochs={config.train.epochs}, so no epoch would be evaluated: lower "
        "eval.every_epochs (0 = every epoch under test_oracle)")
  if config.dataset.name != "demo" and not config.dataset.root:
    raise ValueError(f"--config.dataset.root is empty: point it at the raw {config.dataset.name} "
                     "data (e.g. --config.dataset.root=/data/mvtec)")


def apply_preset(c: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
  """Applies a named preset: `""` (published runs), `paper` (the paper's text) or `smoke`.

  `paper`: 256x256 inputs, 400 epochs and alpha 0.3 as written in the paper.
  `smoke`: tiny images, few epochs and a random-weight backbone, for tests and a first try; its numbers
  mean nothing.
  """
  preset = (preset or "").strip()
  if preset in ("", "reference"):
    return c
  if preset == "paper":
    c.dataset.image_size = 256
    c.dataset.resize = 256
    c.train.epochs = 400
    c.model.k = 0.3
    return c
  if preset == "smoke":
    c.dataset.image_size = 64
    c.dataset.resize = 64
    c.backbone.weights = "random"
    c.backbone.pretrain_dim = 256
    c.backbone.target_dim = 256
    c.model.disc_hidden = 128
    c.train.epochs = 3
    c.train.checkpoint_every = 1
    c.eval.heatmaps = 4
    return c
  raise ValueError(f"unknown config preset {preset!r}: use one of '', 'paper', 'smoke' "
                   "(e.g. --config=configs/mvtec.py:smoke)")


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:preset]` as `--config=` does, for scripts and tests."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_pbas_config", path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset or None)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets `{"model.k": 0.3, ...}` as `--config.model.k=0.3 ...` would; returns `config`.

  Keys are dotted paths below `config` (which may be a section: `apply_overrides(c.model,
  {"k": 0.3})`). A key the config lacks raises KeyError and a value of another type TypeError,
  as on the command line, whether or not `config` is locked (its lock state is kept).
  """
  locked = config.is_locked
  config.lock()
  try:
    config.update_from_flattened_dict(dict(overrides))
  finally:
    if not locked:
      config.unlock()
  return config
