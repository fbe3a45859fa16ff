"""What the absl entry points (`main`, `predict`) share: one-line flag errors and quiet logs."""
import logging as std_logging
import sys

from absl import app
from absl import logging

# Libraries that log every file they write at INFO (orbax: its checkpoint dictionaries; TFDS).
_CHATTY = ("orbax", "tensorflow_datasets")
# JAX tries the TPU backend on every start and logs at INFO that libtpu.so is not installed.
_NO_TPU = "libtpu.so: cannot open shared object file"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a misspelled config key as one line instead of a traceback.

  ml_collections raises AttributeError(KeyError("'epoch'\\nDid you mean ...")) for an unknown key
  of a locked config, which absl's parser lets through.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    cause = e
    while isinstance(cause, BaseException) and cause.args:
      cause = cause.args[0]
    first, *rest = str(cause).splitlines()
    key = first.strip("'\"")
    given = [a.split("=")[0] for a in argv[1:]
             if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not given:  # not an override's key: another error (e.g. inside the config file)
      raise
    sys.stderr.write(f"FATAL Flags parsing error: {given[0]}: the config has no key {key!r}."
                     f"{''.join(' ' + line for line in rest)}\n")
    sys.exit(1)


def _keep(record: std_logging.LogRecord) -> bool:
  if record.levelno >= std_logging.WARNING:
    return True
  if any(lib in record.pathname for lib in _CHATTY):
    return False
  return _NO_TPU not in record.getMessage()


def quiet_library_logs() -> None:
  """Keeps the run's own log readable: drops INFO lines of orbax and TFDS and JAX's libtpu.so line
  (warnings and errors of every library stay)."""
  logging.get_absl_handler().addFilter(_keep)
