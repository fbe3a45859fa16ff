r"""The main job: train and evaluate PBAS on every configured class.

  python -m pbas_jax.main --config=configs/mvtec.py \
      --config.dataset.root=/data/mvtec --config.dataset.classes=bottle,screw

Re-running the same command resumes from the latest checkpoint and skips finished classes.
Under SLURM, `srun` with one task per GPU runs it on all of them: the processes join first
(`sharding.initialize_distributed`) and form one data-parallel mesh.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pbas_jax import cli
from pbas_jax import experiment
from pbas_jax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with a preset: configs/mvtec.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default runs/<config name>[_<preset>].")


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{preset}" if preset else name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Before anything touches a device (importing the package does not).
  sharding.initialize_distributed()
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  cli.quiet_library_logs()
  logging.info("workdir: %s", workdir)
  experiment.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
