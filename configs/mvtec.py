"""PBAS on MVTec AD: the published runs' settings (`:paper` for the paper's text, `:smoke` for a quick check)."""
from pbas_jax import config_base


def get_config(preset=None):
  c = config_base.base_config()
  c.dataset.name = "mvtec"
  return config_base.apply_preset(c, preset)
