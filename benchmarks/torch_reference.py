"""The authors' computations re-stated in torch, written once for the parity tests and benchmarks.

From github.com/cqylunlun/PBAS at commit 7617173 (see docs/reference.md), op for op:
  Backbone         common.NetworkFeatureAggregator: the whole torchvision forward with hooks on
                   the extracted layers (its hooks never stop the forward, so layer4 and fc run on
                   every call, as in the authors' training and prediction)
  patch_features   the rest of pbas.PBAS._embed: PatchMaker.patchify (3x3 Unfold), bilinear
                   upsampling of deeper layers, Preprocessing and Aggregator (adaptive pools)
  Heads.step       one iteration of pbas.PBAS._train_discriminator (TensorBoard logging left out)
  Heads.predict    pbas.PBAS._predict after _embed: projector, discriminator, image score = max,
                   RescaleSegmentor (bilinear upsampling, then scipy gaussian_filter per map)

Imported by `tests/` (through sys.path) and by `benchmarks/*.py`; needs torch (the `convert` extra).
"""
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.ndimage
import torch

F = torch.nn.functional


class Backbone:
  """`backbone(images (B, 3, S, S)) -> [maps (B, C, h, w) of each layer]`, whole model run."""

  def __init__(self, model: torch.nn.Module, layers: Sequence[str]):
    self.model, self.layers, self._outputs = model.eval(), tuple(layers), {}
    for name in self.layers:
      try:
        module = model.get_submodule(name)
      except AttributeError as e:
        raise ValueError(f"{type(model).__name__} has no module {name!r} to hook: the torch "
                         "reference needs a backbone whose layers are torch module names "
                         "(torchvision ResNets)") from e
      if isinstance(module, torch.nn.Sequential):
        module = module[-1]  # as the reference hooks a Sequential's last block
      module.register_forward_hook(self._hook(name))

  def _hook(self, name: str):
    def hook(module, inputs, output):
      del module, inputs
      self._outputs[name] = output
    return hook

  def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
    self._outputs.clear()
    with torch.no_grad():
      self.model(images)
    return [self._outputs[name] for name in self.layers]


def patch_features(maps: Sequence[torch.Tensor], patch_size: int = 3, pretrain_dim: int = 1536,
                   target_dim: int = 1536) -> torch.Tensor:
  """Backbone maps [(B, C_l, h_l, w_l)] -> patch features (B, H, W, target_dim), H x W = maps[0]'s
  grid: the reference's PatchMaker.patchify, upsampling loop, Preprocessing and Aggregator."""
  p, pad = patch_size, (patch_size - 1) // 2
  unfolder = torch.nn.Unfold(kernel_size=p, stride=1, padding=pad, dilation=1)
  patches, grids = [], []
  for x in maps:
    grids.append([s + 2 * pad - (p - 1) for s in x.shape[-2:]])
    unfolded = unfolder(x).reshape(*x.shape[:2], p, p, -1)
    patches.append(unfolded.permute(0, 4, 1, 2, 3))  # (B, N, C, p, p)
  ref = grids[0]
  for i in range(1, len(patches)):
    x = patches[i].reshape(patches[i].shape[0], *grids[i], *patches[i].shape[2:])
    x = x.permute(0, 3, 4, 5, 1, 2)  # (B, C, p, p, h, w)
    base = x.shape
    x = F.interpolate(x.reshape(-1, 1, *base[-2:]), size=ref, mode="bilinear",
                      align_corners=False)
    x = x.reshape(*base[:-2], *ref).permute(0, 4, 5, 1, 2, 3)
    patches[i] = x.reshape(len(x), -1, *x.shape[-3:])
  flat = [x.reshape(-1, *x.shape[-3:]) for x in patches]
  pooled = torch.stack([F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1)
                        for x in flat], dim=1)
  out = F.adaptive_avg_pool1d(pooled.reshape(len(pooled), 1, -1), target_dim)
  return out.reshape(maps[0].shape[0], *ref, target_dim)


def _tensor(x) -> torch.Tensor:
  return torch.tensor(np.asarray(x, np.float32))


def _numpy_tree(tree):
  if isinstance(tree, dict):
    return {key: _numpy_tree(value) for key, value in tree.items()}
  return tree.detach().cpu().numpy().copy()


class Heads:
  """The reference's projector (one Linear), discriminator (Linear, BatchNorm1d, LeakyReLU 0.2,
  Linear without bias, Sigmoid), center and optimizers (Adam with coupled L2 for P, AdamW for D),
  holding the values of a pbas_jax state's `params`, `center` (None: `predict` only) and
  (optionally) `batch_stats`, on torch `device`.
  """

  def __init__(self, params: Mapping[str, Any], center=None, k: float = 0.25,
               batch_stats: Mapping[str, Any] | None = None, lr: float = 1e-4,
               proj_weight_decay: float = 1e-5, dsc_lr: float = 2e-4,
               dsc_weight_decay: float = 1e-2, device: str = "cpu"):
    proj, disc = params["projector"]["layer0"], params["discriminator"]
    dim, hidden = np.shape(disc["block0_linear"]["kernel"])
    self.dim, self.k = dim, k
    self.proj = torch.nn.Sequential(torch.nn.Linear(dim, dim))
    self.disc = torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.LeakyReLU(0.2),
        torch.nn.Linear(hidden, 1, bias=False), torch.nn.Sigmoid())
    with torch.no_grad():
      self.proj[0].weight.copy_(_tensor(proj["kernel"]).T)
      self.proj[0].bias.copy_(_tensor(proj["bias"]))
      self.disc[0].weight.copy_(_tensor(disc["block0_linear"]["kernel"]).T)
      self.disc[0].bias.copy_(_tensor(disc["block0_linear"]["bias"]))
      self.disc[1].weight.copy_(_tensor(disc["block0_bn"]["scale"]))
      self.disc[1].bias.copy_(_tensor(disc["block0_bn"]["bias"]))
      self.disc[3].weight.copy_(_tensor(disc["tail"]["kernel"]).T)
      if batch_stats is not None:
        stats = batch_stats["discriminator"]["block0_bn"]
        self.disc[1].running_mean.copy_(_tensor(stats["mean"]))
        self.disc[1].running_var.copy_(_tensor(stats["var"]))
    self.proj.to(device)
    self.disc.to(device)
    self.proj_opt = torch.optim.Adam(self.proj.parameters(), lr, weight_decay=proj_weight_decay)
    self.dsc_opt = torch.optim.AdamW(self.disc.parameters(), lr=dsc_lr,
                                     weight_decay=dsc_weight_decay)
    self.c = None if center is None else _tensor(center).to(device)

  def step(self, features: torch.Tensor) -> dict[str, float]:
    """One training iteration on patch features (B, H, W, D); returns the step's metrics.

    Also computed by the reference and left out here: r_tf, the mean distance t -> f (k r by
    construction), and the TensorBoard scalars.
    """
    self.proj.train()
    self.disc.train()
    self.dsc_opt.zero_grad()
    self.proj_opt.zero_grad()
    true_feats = self.proj(features.reshape(-1, self.dim))
    similarity = torch.mm(F.normalize(true_feats, dim=1), F.normalize(self.c, dim=1).T)
    center_feats = self.c[torch.argmax(similarity, dim=1)]
    direct = true_feats - center_feats
    d_ct = torch.norm(direct, dim=1, keepdim=True)
    r_ct = d_ct.mean()
    fake_feats = true_feats + ((direct / d_ct) * r_ct * self.k).detach()
    r_cf = torch.norm(fake_feats - center_feats, dim=1, keepdim=True).mean()
    scores = self.disc(torch.concat([true_feats, fake_feats]))
    n = len(true_feats)
    true_scores, fake_scores = scores[:n], scores[n:]
    true_loss = torch.nn.BCELoss()(true_scores, torch.zeros_like(true_scores))
    fake_loss = torch.nn.BCELoss()(fake_scores, torch.ones_like(fake_scores))
    loss = r_ct + true_loss + fake_loss
    loss.backward()
    self.proj_opt.step()
    self.dsc_opt.step()
    p_true = (true_scores.detach() < 0.5).sum() / n
    p_fake = (fake_scores.detach() >= 0.5).sum() / n
    return {"loss_c": r_ct.item(), "loss_n": true_loss.item(), "loss_a": fake_loss.item(),
            "loss": loss.item(), "r": r_ct.item(), "r_fake": r_cf.item(),
            "p_true": p_true.item(), "p_fake": p_fake.item()}

  def grads(self) -> dict[str, Any]:
    """The gradients of the last `step` as numpy arrays, in pbas_jax's parameter tree."""
    proj, disc = self.proj, self.disc
    grads = {"projector": {"layer0": {"kernel": proj[0].weight.grad.T, "bias": proj[0].bias.grad}},
             "discriminator": {
                 "block0_linear": {"kernel": disc[0].weight.grad.T, "bias": disc[0].bias.grad},
                 "block0_bn": {"scale": disc[1].weight.grad, "bias": disc[1].bias.grad},
                 "tail": {"kernel": disc[3].weight.grad.T}}}
    return _numpy_tree(grads)

  def variables(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, batch_stats) as numpy arrays, in pbas_jax's trees."""
    proj, disc = self.proj, self.disc
    params = {"projector": {"layer0": {"kernel": proj[0].weight.T, "bias": proj[0].bias}},
              "discriminator": {
                  "block0_linear": {"kernel": disc[0].weight.T, "bias": disc[0].bias},
                  "block0_bn": {"scale": disc[1].weight, "bias": disc[1].bias},
                  "tail": {"kernel": disc[3].weight.T}}}
    stats = {"discriminator": {"block0_bn": {"mean": disc[1].running_mean,
                                             "var": disc[1].running_var}}}
    return _numpy_tree(params), _numpy_tree(stats)

  def predict(self, features: torch.Tensor, size: int,
              sigma: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Patch features (B, H, W, D) -> image scores (B,) and pixel maps (B, size, size)."""
    self.proj.eval()
    self.disc.eval()
    b, h, w, _ = features.shape
    with torch.no_grad():
      patch = self.disc(self.proj(features.reshape(-1, self.dim))).reshape(b, h, w)
      image_scores = patch.reshape(b, -1).max(dim=1).values.cpu().numpy()
      up = F.interpolate(patch.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
      maps = [scipy.ndimage.gaussian_filter(m, sigma=sigma) for m in up.squeeze(1).cpu().numpy()]
    return image_scores, np.stack(maps)
