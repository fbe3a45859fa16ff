"""Shared test setup.

Eight host devices are forced before JAX starts so that sharding tests see a multi-device mesh;
single-device code keeps using the default device.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def _in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
  """Skips a check whose prerequisite is missing locally; fails it under CI=true."""
  if condition:
    return
  if _in_ci():
    pytest.fail(f"{why} (CI=true: required, not skipped)")
  pytest.skip(why)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The folder named by $PBAS_DATA (holds mpdd/metal_plate)."""
  root = os.environ.get("PBAS_DATA")
  if not root:
    guess = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    root = str(guess) if guess.is_dir() else ""
  require(bool(root) and pathlib.Path(root, "mpdd", "metal_plate").is_dir(),
          "real data missing: set PBAS_DATA to a folder holding mpdd/metal_plate")
  return pathlib.Path(root)


@pytest.fixture(scope="session")
def mpdd_root(shared_data) -> pathlib.Path:
  return shared_data / "mpdd"
