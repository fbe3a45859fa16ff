"""PBAS on MVTec AD, the published runs' settings (`:paper`: the paper's text; `:smoke`: a test)."""
from pbas_jax import config_base


def get_config(preset=None):
  c = config_base.base_config()
  c.dataset.name = "mvtec"
  c.dataset.resize_mode = "crop"  # the reference: shorter side to dataset.resize, center crop
  return config_base.apply_preset(c, preset)
