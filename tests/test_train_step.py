"""The PBAS train step: torch parity with the reference step, learning, epoch loop, scoring."""
import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require
from pbas_jax import center as center_lib
from pbas_jax import config_base
from pbas_jax import engine
from pbas_jax import heads
from pbas_jax import losses
from pbas_jax import synthesis
from pbas_jax import sharding
from pbas_jax import train

# benchmarks/torch_reference.py: the authors' torch computations, shared with the benchmarks.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))


def _config(dim_hidden=32, **model):
  config = config_base.base_config()
  config.model.disc_hidden = dim_hidden
  config_base.apply_overrides(config.model, model)
  return config


def _project(state):
  return functools.partial(state.projector.apply, {"params": state.params["projector"]})


def _state(config, dim, features, seed=0, batch=2):
  """A state whose center bank is built over `features` in their order, `batch` at a time."""
  state = train.create_train_state(config, jax.random.key(seed), dim)
  features = jnp.asarray(features)
  return state.replace(center=center_lib.init_center(
      _project(state), features, jnp.arange(len(features)), batch))


# ---------------------------------------------------------------------------------------------
# Parity with the reference step, re-stated in torch.


def _get(tree, path):
  return functools.reduce(lambda node, name: node[name], path, tree)


def _names(path):
  return tuple(p.key for p in path)


@pytest.mark.parity
def test_three_steps_match_torch_reference():
  require(importlib.util.find_spec("torch") is not None, "torch missing: install the convert extra")
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top  (needs torch)
  dim, hidden, k = 512, 256, 0.25
  config = _config(dim_hidden=hidden, k=k)
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(8, 6, 6, dim)) + rng.normal(size=(6, 6, dim))).astype(np.float32)
  state = _state(config, dim, data)
  reference = torch_reference.Heads(jax.device_get(state.params), jax.device_get(state.center), k)
  step = jax.jit(train.make_train_step(config))
  params_before = jax.tree.map(np.asarray, state.params)

  # The bias of D's first Linear feeds BatchNorm, which removes any shift: its true gradient is
  # exactly 0, so both sides take Adam steps on float32 noise there and the bias drifts apart by
  # up to lr per step. It is checked as noise, and its effect on running_mean is accounted for.
  bias = ("discriminator", "block0_linear", "bias")
  ever_noise, mean_shift = None, 0.0
  for i in range(3):
    ours_bias = np.asarray(_get(state.params, bias))
    mean_shift = 0.9 * mean_shift + 0.1 * (ours_bias - _get(reference.variables()[0], bias))
    batch = data[2 * i:2 * i + 2]
    state, metrics = step(state, batch, jax.random.key(i))
    ref_metrics = reference.step(torch.tensor(batch))
    ref_grads = reference.grads()
    for name in ("loss_c", "loss_n", "loss_a", "loss"):
      ref = ref_metrics[name]
      np.testing.assert_allclose(float(metrics[name]), ref, rtol=1e-5, err_msg=f"step {i} {name}")
    if i == 0:
      mu = dict(optax.tree_utils.tree_get_all_with_path(state.opt_state, "mu"))
      ours = {}
      for path, tree in mu.items():
        label = "discriminator" if "'discriminator'" in jax.tree_util.keystr(path) else "projector"
        ours[label] = jax.tree.map(lambda m: np.asarray(m) / 0.1, tree[label])
      # Coupled L2: the projector's Adam saw g + wd * p.
      ours["projector"] = jax.tree.map(lambda g, p: g - 1e-5 * p, ours["projector"],
                                       params_before["projector"])
      for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(ours),
                                jax.tree.leaves(ref_grads)):
        if _names(path) == bias:
          continue
        np.testing.assert_allclose(g, ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=f"gradient {jax.tree_util.keystr(path)}")
      kernel_scale = np.abs(_get(ref_grads, bias[:2] + ("kernel",))).max()
      for g in (_get(ours, bias), _get(ref_grads, bias)):
        assert np.abs(g).max() < 1e-5 * kernel_scale
    # Gradients agree to 1e-5 of each tensor's largest entry (checked above). An entry whose
    # gradient, as Adam sees it (the projector's with its coupled L2 term), is within that noise
    # of zero may change sign between two correct implementations and Adam turns that into an
    # lr-sized step: such entries are excused, and counted.
    seen = dict(ref_grads, projector=jax.tree.map(lambda g, p: g + 1e-5 * p,
                                                  ref_grads["projector"], params_before["projector"]))
    noise = jax.tree.map(lambda g, r: np.abs(g) <= 1e-5 * np.abs(r).max(), seen, ref_grads)
    ever_noise = noise if ever_noise is None else jax.tree.map(np.logical_or, ever_noise, noise)
    ref_params, ref_stats = reference.variables()
    params_before = ref_params

    ours_stats = state.batch_stats["discriminator"]["block0_bn"]
    ref_bn = ref_stats["discriminator"]["block0_bn"]
    np.testing.assert_allclose(ours_stats["var"], ref_bn["var"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours_stats["mean"] - mean_shift, ref_bn["mean"], rtol=0, atol=1e-6)
    drift = np.abs(np.asarray(_get(state.params, bias)) - _get(ref_params, bias)).max()
    assert drift <= 2 * 2e-4 * (i + 1), f"pre-BN bias drift {drift:.2e} exceeds Adam's step size"

    total, excused = 0, 0
    for (path, ours), ref, flag in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                       jax.tree.leaves(ref_params), jax.tree.leaves(ever_noise)):
      if _names(path) == bias:
        continue
      off = np.abs(np.asarray(ours) - ref) > 1e-6
      assert not np.any(off & ~flag), (
          f"step {i} {jax.tree_util.keystr(path)}: {np.abs(np.asarray(ours) - ref).max():.2e} off")
      total += off.size
      excused += int(np.sum(off))
  print(f"parity: {excused} of {total} parameters differ by > 1e-6 (float32-noise gradients)")
  assert excused * 100_000 < total, f"{excused} of {total} parameters differ (noise gradients)"


# ---------------------------------------------------------------------------------------------
# The fused first discriminator layer equals the concatenated batch.


def test_ray_pair_dense_equals_concatenated_batch():
  rng = np.random.default_rng(1)
  t = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  disc = heads.Discriminator(hidden=6)
  variables = disc.init(jax.random.key(0), t, train=False)
  idx, c_near = center_lib.nearest(t, c)

  def fused(params, t):
    s = synthesis.ray_scale(center_lib.distance(t, c_near), 0.25)
    out, stats = disc.apply({"params": params, "batch_stats": variables["batch_stats"]}, t,
                            train=True, ray=(c, idx, s), mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), stats

  def plain(params, t):
    f = synthesis.ray(t, c_near, 0.25)
    out, stats = disc.apply({"params": params, "batch_stats": variables["batch_stats"]},
                            jnp.concatenate([t, f]), train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), stats

  (v1, s1), g1 = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(variables["params"], t)
  (v2, s2), g2 = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(variables["params"], t)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batchnorm_running_var_is_unbiased():
  x = jnp.arange(12.0).reshape(4, 3) ** 1.5
  bn = heads.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  y, new = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-6)
  np.testing.assert_allclose(y, (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), rtol=1e-5,
                             atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Learning, epochs, scoring.


def _clustered(seed, n=32, grid=4, dim=32):
  """Normal features: one prototype per position plus isotropic noise."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(grid, grid, dim)) + 0.3 * rng.normal(size=(n, grid, grid, dim))
          ).astype(np.float32)


def _assert_trees_close(a, b, **tolerance):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **tolerance)


def test_learning_lowers_center_loss_and_separates_synthetic_anomalies():
  # With the reference's k = 0.25 and learning rates, separating anomalies that sit 0.25 r beyond
  # a 32-dim isotropic shell takes thousands of steps; k = 1 and 10x rates make 200 enough.
  config = _config(dim_hidden=64, k=1.0)
  config.optim.lr, config.optim.dsc_lr = 1e-3, 2e-3
  config.dataset.batch_size = 8
  features = jnp.asarray(_clustered(0))
  state = _state(config, 32, features, batch=8)
  mesh = sharding.make_mesh(jax.devices()[:1])
  trainer = engine.Trainer(config, [engine.Run(1, 1.0)], mesh)
  states, history = trainer.train(engine.stack([state]), features, 0, 50)  # 4 steps x 50 epochs
  first, last = history[0][0], history[-1][0]
  assert int(engine.unstack(states)[0].step) == 200
  assert last["loss_c"] < 0.85 * first["loss_c"], (first, last)
  assert first["p_true"] < 0.7 and first["p_fake"] < 0.7, first
  assert last["p_true"] > 0.9 and last["p_fake"] > 0.9, last
  assert last["loss_n"] + last["loss_a"] < 0.6 * (first["loss_n"] + first["loss_a"])


def test_step_metrics_are_consistent():
  config = _config(k=0.4)
  features = _clustered(2, n=4)
  state = _state(config, 32, features)
  new, m = jax.jit(train.make_train_step(config))(state, features[:2], jax.random.key(0))
  np.testing.assert_allclose(m["loss"], m["loss_c"] + m["loss_n"] + m["loss_a"], rtol=1e-6)
  np.testing.assert_allclose(m["r"], m["loss_c"], rtol=1e-6)
  np.testing.assert_allclose(m["r_fake"], 1.4 * m["r"], rtol=1e-5)  # f - c = (1 + k r / d)(t - c)
  assert 0 <= m["p_true"] <= 1 and 0 <= m["p_fake"] <= 1
  assert m["grad_norm_projector"] > 0 and m["grad_norm_discriminator"] > 0
  assert int(new.step) == 1


def test_abl_alone_trains_the_projector_on_center_loss_only():
  """model.rbo=False (Table V, ABL alone): the loss is L_c; D, its BatchNorm statistics and its
  optimizer never move (no weight decay either) and no discriminator metric is logged."""
  config = _config(rbo=False)
  features = _clustered(2, n=4)
  state = _state(config, 32, features)
  new, m = jax.jit(train.make_train_step(config))(state, features[:2], jax.random.key(0))
  np.testing.assert_allclose(m["loss"], m["loss_c"], rtol=1e-7)
  assert set(m) == {"loss", "loss_c", "r", "grad_norm_projector"}
  assert float(m["grad_norm_projector"]) > 0
  jax.tree.map(np.testing.assert_array_equal, new.params["discriminator"],
               state.params["discriminator"])
  jax.tree.map(np.testing.assert_array_equal, new.batch_stats, state.batch_stats)

  def center_loss(projector_params):
    t = state.projector.apply({"params": projector_params}, features[:2].reshape(-1, 32))
    return losses.center_loss(t, center_lib.nearest(t, state.center)[1])

  expected = optax.tree.norm(jax.grad(center_loss)(state.params["projector"]))
  np.testing.assert_allclose(m["grad_norm_projector"], expected, rtol=1e-5)


def test_gaussian_synthesis_step_uses_key():
  config = _config(synthesis="gaussian", noise_std=0.5)
  features = _clustered(3, n=4)
  state = _state(config, 32, features)
  step = jax.jit(train.make_train_step(config))
  _, m0 = step(state, features[:2], jax.random.key(0))
  _, m1 = step(state, features[:2], jax.random.key(1))
  assert float(m0["loss_a"]) != float(m1["loss_a"])
  np.testing.assert_allclose(m0["loss_c"], m1["loss_c"], rtol=1e-6)


def test_step_vmaps_over_runs():
  config = _config()
  features = _clustered(4, n=4)
  states = [_state(config, 32, features, seed=s) for s in (0, 1)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  step = train.make_train_step(config)
  keys = jax.random.split(jax.random.key(0), 2)
  batched, metrics = jax.jit(jax.vmap(step, in_axes=(0, None, 0)))(stacked, features[:2], keys)
  for i, state in enumerate(states):
    single, m = jax.jit(step)(state, features[:2], keys[i])
    np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=1e-5)
    ours = jax.tree.map(lambda x: x[i], batched.params)
    # The pre-BatchNorm bias moves on float32-noise gradients (see the parity test): not compared.
    for tree in (ours, single.params):
      tree["discriminator"] = dict(tree["discriminator"], block0_linear={
          "kernel": tree["discriminator"]["block0_linear"]["kernel"]})
    _assert_trees_close(ours, single.params, rtol=1e-5, atol=1e-7)


def test_score_patches():
  config = _config()
  features = jnp.asarray(_clustered(5, n=6))
  state = _state(config, 32, features)
  state, _ = jax.jit(train.make_train_step(config))(state, features[:4], jax.random.key(0))
  scores = train.score_patches(state, features[:3])
  assert scores.shape == (3, 4, 4)
  # Eval-mode BatchNorm: running statistics, so a patch's score does not depend on its batch.
  np.testing.assert_allclose(train.score_patches(state, features[:1])[0], scores[0], rtol=1e-5)
  u = _project(state)(features[:3].reshape(-1, 32))
  p = state.params["discriminator"]
  stats = state.batch_stats["discriminator"]["block0_bn"]
  h = u @ p["block0_linear"]["kernel"] + p["block0_linear"]["bias"]
  h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * p["block0_bn"]["scale"] \
      + p["block0_bn"]["bias"]
  h = jnp.where(h > 0, h, 0.2 * h)
  expected = jax.nn.sigmoid(h @ p["tail"]["kernel"])[:, 0]
  np.testing.assert_allclose(scores.reshape(-1), expected, rtol=1e-5, atol=1e-6)
  dist = train.score_patches(state, features[:3], scoring="center_distance")
  np.testing.assert_allclose(dist.reshape(-1), center_lib.distance_scores(u, state.center),
                             rtol=1e-5)


def test_errors_name_the_setting():
  config = _config()
  state = train.create_train_state(config, jax.random.key(0), 8)
  with pytest.raises(ValueError, match="no center bank"):
    train.make_train_step(config)(state, jnp.zeros((1, 2, 2, 8)), jax.random.key(0))
  with pytest.raises(ValueError, match="model.synthesis"):
    train.make_train_step(_config(synthesis="mixup"))
  with pytest.raises(ValueError, match="model.disc_layers"):
    train.create_train_state(_config(disc_layers=1), jax.random.key(0), 8)
