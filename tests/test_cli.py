"""The entry points' shared log filter: library chatter out, warnings and the run's own lines in."""
import logging

from pbas_jax import cli


def _record(pathname: str, level: int, message: str) -> logging.LogRecord:
  return logging.LogRecord("x", level, pathname, 1, message, None, None)


def test_library_info_and_the_libtpu_line_are_dropped_warnings_kept():
  orbax = "/venv/site-packages/orbax/checkpoint/_src/checkpointer.py"
  tfds = "/venv/site-packages/tensorflow_datasets/core/dataset_builder.py"
  jax_bridge = "/venv/site-packages/jax/_src/xla_bridge.py"
  no_tpu = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
            "cannot open shared object file: No such file or directory")
  assert not cli._keep(_record(orbax, logging.INFO, "{'item': ...} saved"))
  assert not cli._keep(_record(tfds, logging.INFO, "Constructing tf.data.Dataset"))
  assert not cli._keep(_record(jax_bridge, logging.INFO, no_tpu))
  assert cli._keep(_record(jax_bridge, logging.INFO, "Unable to initialize backend 'cuda': ..."))
  assert cli._keep(_record(orbax, logging.WARNING, "disk full"))
  assert cli._keep(_record("/repo/pbas_jax/experiment.py", logging.INFO, "workdir: runs/x"))
