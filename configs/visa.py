"""PBAS on VisA (split_csv/1cls.csv), the published runs' settings.

`:paper` for the paper's text, `:smoke` for a quick check.
"""
from pbas_jax import config_base


def get_config(preset=None):
  c = config_base.base_config()
  c.dataset.name = "visa"
  c.dataset.resize_mode = "crop"  # the reference: shorter side to dataset.resize, center crop
  return config_base.apply_preset(c, preset)
