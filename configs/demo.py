"""The embedded demo: PBAS on real ImageNet EfficientNet-Lite0 features, offline, in minutes.

  python -m pbas_jax.main --config=configs/demo.py

The dataset (procedural textured surfaces with synthetic scratches, dents, stains, cuts, holes and
colour defects, exact masks) is written on first use under $PBAS_JAX_CACHE/demo (default
~/.cache/pbas_jax/demo); the packaged EfficientNet-Lite0 weights are converted once on first use.
Sized to finish in about 3 minutes on a 2-core CPU: 128 px images, 384-dim patch features.
"""
from pbas_jax import config_base


def get_config(preset=None):
  c = config_base.base_config()
  c.dataset.name = "demo"
  c.dataset.image_size = 128
  c.dataset.resize = 128
  c.backbone.name = "efficientnet_lite0"
  c.backbone.weights = "imagenet"
  c.backbone.layers = ("blocks2", "blocks4")  # stride 8 (40 ch) and stride 16 (112 ch)
  c.backbone.pretrain_dim = 384
  c.backbone.target_dim = 384
  c.model.disc_hidden = 256
  c.train.epochs = 40
  c.train.checkpoint_every = 10
  c.eval.heatmaps = 12
  return config_base.apply_preset(c, preset)
