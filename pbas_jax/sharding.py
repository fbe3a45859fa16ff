"""The device mesh `(runs, data)`, shardings of runs, batches and features, and their placement.

The mesh is 2-D (one device: a 1x1 mesh). Training places its R runs along `runs` (the train
state, keys and hyperparameters are split along their leading run axis: `run_sharding`), and the
devices of one `runs` slot split each batch along `data`; `jax.jit` with explicit `in_shardings` /
`out_shardings` runs one SPMD program, XLA adding the all-reduces that batch means need over
`data` only, so the maths is that of one device on the whole batch (up to float summation order).
With `data` of size 1 (e.g. 8 runs on 8 devices) a run's step needs no collective at all.
The layout follows from R and the device count (`mesh_shape`): `runs` = gcd(R, devices), or
`train.mesh='RxD'`.

The cached training features are split along their rows over `data` (`put_rows`: each device
holds N / data rows, zero-padded, never read), and a batch is gathered from them by `gather_rows`
(each device takes the rows it holds, the sum over `data` assembles the batch: exact).

A batch whose size the device count does not divide cannot be split evenly:
- per-image functions (feature extraction, inference) pad it with zero rows and drop their outputs
  (`jit_per_example`); they split over every device of the mesh (`batch_sharding`);
- the train step computes batch means and the discriminator's BatchNorm over the joint batch, so
  padding would change its maths; a batch that `data` does not divide stays whole on the devices
  of its run.

Multi-host (one process per GPU under SLURM `srun`): `initialize_distributed` joins the processes,
and `global_batch` assembles a global array from each process's own rows of a batch. A process
reads and decodes only the rows of a batch that its devices hold (`example_rows`) and hands them to
a per-example function as such (`jit_per_example(...)(..., global_rows=n)`).
"""
import functools
import math
import os
import re
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RUNS = "runs"
DATA = "data"


def initialize_distributed() -> bool:
  """Joins the processes of a multi-task SLURM step: `jax.distributed.initialize()`.

  Runs only inside `srun` with more than one task (`SLURM_STEP_NUM_TASKS > 1`; an `sbatch`
  script alone sets no step variables), one process per GPU. JAX reads the coordinator, process
  count and id from SLURM and gives each process the GPU numbered `SLURM_LOCALID`, unless
  `srun --gpus-per-task=1` already left the process a single visible GPU. Must be called before
  anything touches a device.

  Returns:
    Whether this is a multi-process run.
  """
  if jax.distributed.is_initialized():
    return True
  if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
    return False
  visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  jax.distributed.initialize(local_device_ids=[0] if len(visible) == 1 else None)
  return True


def parse_layout(layout: str, num_runs: int) -> tuple[int, int] | None:
  """`train.mesh`: None for `auto`, else its `(runs, data)` sizes, runs dividing `num_runs`."""
  if layout == "auto":
    return None
  match = re.fullmatch(r"(\d+)x(\d+)", layout)
  if not match or int(match[1]) < 1 or int(match[2]) < 1:
    raise ValueError(f"--config.train.mesh={layout!r}: use 'auto' or 'RxD' (runs x data "
                     "devices, e.g. '2x4')")
  runs, data = int(match[1]), int(match[2])
  if num_runs % runs:
    raise ValueError(f"--config.train.mesh={layout!r} places runs over {runs} devices, which "
                     f"does not divide the {num_runs} run(s) (train.num_runs x train.k_values): "
                     "use 'auto' or a runs size that divides them")
  return runs, data


def mesh_shape(layout: str, num_runs: int, num_devices: int) -> tuple[int, int]:
  """`(runs, data)` sizes of the training mesh (`train.mesh`).

  `auto`: runs = gcd(R, devices), data = devices / runs: R runs on R devices one per device, a
  single run splits its batches over every device, 2 runs on 8 devices are 2 x 4, 12 runs on 8
  devices 4 x 2 (3 runs per device). `'RxD'`: that layout; R x D must be the device count and R
  must divide the number of runs.
  """
  fixed = parse_layout(layout, num_runs)
  if fixed is None:
    runs = math.gcd(num_runs, num_devices)
    return runs, num_devices // runs
  if fixed[0] * fixed[1] != num_devices:
    raise ValueError(f"--config.train.mesh={layout!r} needs {fixed[0] * fixed[1]} devices, "
                     f"there are {num_devices}: use 'auto' or a layout R x D = {num_devices}")
  return fixed


def make_mesh(devices=None, runs: int = 1) -> Mesh:
  """A `(runs, data)` mesh over `devices` (default: all devices of all processes) in their order,
  `runs` rows of `len(devices) / runs` devices (see `mesh_shape`)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if devices.size % runs:
    raise ValueError(f"a runs axis of {runs} does not divide {devices.size} devices")
  return Mesh(devices.reshape(runs, devices.size // runs), (RUNS, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters of inference, keys of one run, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """The batch axis (`axis`, default the leading one) split over every device, other axes whole."""
  return NamedSharding(mesh, PartitionSpec(*(None,) * axis, mesh.axis_names))


def run_sharding(mesh: Mesh) -> NamedSharding:
  """The leading run axis split over `runs` (train state, keys, hyperparameters, subsets)."""
  return NamedSharding(mesh, PartitionSpec(RUNS))


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (image) axis split over `data`, whole over `runs` (cached training features)."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def put_rows(x, mesh: Mesh) -> jax.Array:
  """`x (N, ...)` zero-padded to a multiple of the `data` size and split over `data`
  (`rows_sharding`): each device holds `ceil(N / data)` rows. The padding rows are never
  gathered (the engine draws indices below N)."""
  target, rows = rows_sharding(mesh), x.shape[0] + (-x.shape[0] % mesh.shape[DATA])
  if isinstance(x, jax.Array) and not (x.is_fully_addressable and jax.process_count() > 1):
    return jax.device_put(_pad_to(x, rows), target)
  x = np.asarray(x)  # from the host: each device gets its rows, padding made per shard

  def shard(index):
    part = x[index[0]]
    return _pad_to(part, len(range(*index[0].indices(rows))))[(slice(None), *index[1:])]

  return jax.make_array_from_callback((rows, *x.shape[1:]), target, shard)


def gather_rows(features: jax.Array, idx: jax.Array, mesh: Mesh) -> jax.Array:
  """`features[idx]` for `features (N', ...)` split over `data` (`put_rows`), `idx (B,)`.

  Each device takes the rows it holds (zeros elsewhere) and the sum over `data` assembles the
  batch, so no device ever holds more than its rows of the features. The batch `(B, ...)` comes
  out split over `data` when that divides B (else whole on every device of `data`). Traced inside
  the engine's per-run map (`jax.vmap(..., spmd_axis_name=RUNS)` adds the run axis).
  """
  data = mesh.shape[DATA]
  split = idx.shape[0] % data == 0

  def local(rows, idx):
    if data == 1:
      return rows[idx]
    at = idx - jax.lax.axis_index(DATA) * rows.shape[0]
    mine = (at >= 0) & (at < rows.shape[0])
    taken = rows[jnp.where(mine, at, 0)]
    taken = jnp.where(mine.reshape(-1, *(1,) * (taken.ndim - 1)), taken, jnp.zeros_like(taken))
    if split:
      return jax.lax.psum_scatter(taken, DATA, scatter_dimension=0, tiled=True)
    return jax.lax.psum(taken, DATA)

  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(DATA), PartitionSpec()),
                       out_specs=PartitionSpec(DATA if split else None))(features, idx)


def pad_rows(x, multiple: int):
  """`x (N, ...)` with zero rows appended up to a multiple of `multiple` (numpy or jax)."""
  return _pad_to(x, x.shape[0] + (-x.shape[0] % multiple))


def _pad_to(x, rows: int):
  """`x (N, ...)` with zero rows appended up to `rows >= N` rows."""
  extra = rows - x.shape[0]
  if not extra:
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.concatenate([x, xp.zeros((extra, *x.shape[1:]), x.dtype)])


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
  """The rows of a global `global_shape` array that this process's devices hold under `sharding`.

  With one process, all of them. Raises if they are not one contiguous range (a mesh whose device
  order interleaves processes).
  """
  n = global_shape[0]
  indices = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
  ranges = sorted({index[0].indices(n)[:2] if index else (0, n) for index in indices})
  for (_, stop), (start, _) in zip(ranges, ranges[1:]):
    if start > stop:
      raise ValueError(f"this process's devices hold rows {ranges} of a {global_shape} array, not "
                       "one contiguous range: build the mesh in jax.devices() order (make_mesh)")
  return slice(ranges[0][0], max(stop for _, stop in ranges))


def global_batch(local: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
  """A global `(global_rows, ...)` array from this process's rows `local` (`process_rows`).

  Each process passes only the rows its devices hold (`jax.make_array_from_process_local_data`);
  with one process `local` is the whole batch and this equals `jax.device_put(local, sharding)`.
  """
  return jax.make_array_from_process_local_data(sharding, np.asarray(local),
                                                (global_rows, *local.shape[1:]))


def example_rows(mesh: Mesh, n: int) -> slice:
  """The rows of a batch of `n` examples that this process's devices hold under `jit_per_example`.

  The batch is zero-padded to a multiple of the device count and split over the devices
  (`batch_sharding`); these are this process's rows of it (`process_rows`) less the padding, so
  possibly none. With one process, all `n`.
  """
  rows = process_rows(batch_sharding(mesh), (n + (-n % mesh.size),))
  return slice(min(rows.start, n), min(rows.stop, n))


def example_batch(local: np.ndarray, mesh: Mesh, n: int) -> jax.Array:
  """The global batch of `n` examples, zero-padded and split as `jit_per_example` splits it, from
  this process's rows `local` of it (`example_rows(mesh, n)`).

  Returns:
    `(G, ...)`: G = n rounded up to a multiple of the device count, split over the devices.
  """
  mine = example_rows(mesh, n)
  if local.shape[0] != mine.stop - mine.start:
    raise ValueError(f"this process holds rows {mine.start}:{mine.stop} of a batch of {n} on "
                     f"{mesh.size} devices, got {local.shape[0]} rows: feed the rows of "
                     "sharding.example_rows(mesh, n)")
  padded = n + (-n % mesh.size)
  share = process_rows(batch_sharding(mesh), (padded,))
  return global_batch(_pad_to(np.asarray(local), share.stop - share.start), batch_sharding(mesh),
                      padded)


def put(tree: Any, sharding: NamedSharding) -> Any:
  """Every array leaf of `tree` placed with `sharding`; a no-op for leaves already there.

  Host (numpy) leaves, scalars included, hold the whole array, the same on every process: each
  device of this process gets its part (`jax.make_array_from_callback`). Device leaves are moved
  or resharded with `jax.device_put`, except, with several processes, arrays local to this
  process (the same on every process), which go through the host.
  """
  def place(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      # Placed as their raw data: device_put cannot reshard multi-process key arrays.
      return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() > 1:
      x = np.asarray(x)
    if isinstance(x, (np.ndarray, np.generic)):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.device_put(x, sharding)

  return jax.tree.map(place, tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A numpy copy of a (possibly multi-process) global array, gathered from every process."""
  if isinstance(x, np.ndarray) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def jit_per_example(fn: Callable, mesh: Mesh, num_consts: int = 1, **jit_kwargs) -> Callable:
  """`fn(*consts, batch)` jitted to run each example of `batch` on its own device slice.

  For functions whose outputs' row i depends only on `batch[i]` (no batch statistics): the
  `num_consts` leading arguments are replicated, `batch (B, ...)` is zero-padded to a multiple of
  the device count and split over the devices, and every output `(B', ...)` comes back with the
  padding rows dropped. Compiled once per padded shape.

  The returned function also takes `global_rows=n`: `batch` is then only this process's rows
  (`example_rows(mesh, n)`, a numpy array) of a global batch of `n` examples, which no process
  holds whole (multi-process runs decode only their own rows); the outputs are global arrays of
  `n` rows. With one process that is the whole batch, and both calls are the same.

  Args:
    fn: the function; outputs are a pytree of arrays with a leading batch axis.
    mesh: the device mesh.
    num_consts: how many leading arguments are replicated (parameters, train state).
    **jit_kwargs: passed to `jax.jit` (e.g. `compiler_options`).
  """
  rep, rows = replicated(mesh), batch_sharding(mesh)
  jitted = jax.jit(fn, in_shardings=(rep,) * num_consts + (rows,), out_shardings=rows,
                   **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, global_rows: int | None = None):
    *consts, batch = args
    if global_rows is None:  # the whole batch, on every process
      n, batch = batch.shape[0], put(pad_rows(batch, mesh.size), rows)
    else:
      n, batch = global_rows, example_batch(batch, mesh, global_rows)
    out = jitted(*put(tuple(consts), rep), batch)
    return out if n % mesh.size == 0 else jax.tree.map(lambda y: y[:n], out)

  return call
