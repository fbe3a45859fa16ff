"""config_base.apply_overrides: dotted keys set as the command line sets them, typos refused."""
import pytest

from pbas_jax import config_base


def test_overrides_set_dotted_keys_and_sections():
  config = config_base.base_config()
  assert config_base.apply_overrides(config, {"model.k": 0.3, "train.k_values": (0.1, 0.3),
                                              "train.epochs": 2}) is config
  assert (config.model.k, config.train.k_values, config.train.epochs) == (0.3, (0.1, 0.3), 2)
  config_base.apply_overrides(config.model, {"disc_hidden": 8, "rbo": False})
  assert (config.model.disc_hidden, config.model.rbo) == (8, False)
  assert not config.is_locked  # the lock state is kept


@pytest.mark.parametrize("overrides, error, message", [
    ({"model.bogus": 1}, KeyError, "bogus"),
    ({"modl.k": 1}, KeyError, "modl"),
    ({"model.k": "high"}, TypeError, "'k'"),
])
def test_unknown_keys_and_wrong_types_raise(overrides, error, message):
  config = config_base.base_config()
  with pytest.raises(error, match=message):
    config_base.apply_overrides(config, overrides)
  assert "bogus" not in config.model and not config.is_locked
  locked = config_base.base_config().lock()
  with pytest.raises(error, match=message):
    config_base.apply_overrides(locked, overrides)
  assert locked.is_locked
