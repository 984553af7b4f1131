"""A plain NumPy reference of the original EC2T step, written from docs/algorithm.md §2–5.

It mirrors what the original PyTorch implementation does, layer by layer in a
Python loop, in float32, with PyTorch-style Adam. It exists to check the jitted
optax transformation against an independent, readable implementation; it is
not meant to be fast.

The only deliberate difference from the original is shared with
`ec2t_jax.ternary.snap_centroids`: the centroids placed in the network are
rounded to `4·ulp` of the larger one, so that additive optax updates hit the
ternary levels exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

f32 = np.float32


@dataclasses.dataclass
class Adam:
  """PyTorch `torch.optim.Adam` (no weight decay) on one float32 array."""

  lr: float
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  m: np.ndarray | None = None
  v: np.ndarray | None = None
  t: int = 0

  def step(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Returns the updated parameter."""
    if self.m is None:
      self.m = np.zeros_like(param, f32)
      self.v = np.zeros_like(param, f32)
    self.t += 1
    self.m = f32(self.b1) * self.m + f32(1 - self.b1) * grad
    self.v = f32(self.b2) * self.v + f32(1 - self.b2) * grad * grad
    m_hat = self.m / f32(1 - self.b1**self.t)
    v_hat = self.v / f32(1 - self.b2**self.t)
    return (param - f32(self.lr) * m_hat / (np.sqrt(v_hat) + f32(self.eps))).astype(f32)


def snap(c: np.ndarray) -> np.ndarray:
  """Rounds `[w_p, w_n]` to multiples of 4 ulp (float32) of the larger one."""
  m = max(float(np.max(c)), float(np.finfo(f32).tiny))
  _, e = np.frexp(f32(m))
  grid = f32(np.ldexp(1.0, max(int(e) - 1 - 23 + 2, -126)))
  return (np.round(c / grid) * grid).astype(f32)


def nearest(w: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Nearest level, ties to the lowest index."""
  lv = np.array([-c[1], 0.0, c[0]], f32)
  d = (w[None] - lv.reshape((3,) + (1,) * w.ndim)) ** 2
  return np.argmin(d, axis=0).astype(np.int8)


def pmf(a_pre: np.ndarray, p0_min: float, parity: bool) -> np.ndarray:
  """Probabilities with empty clusters counted as one and the sparsity floor."""
  n = a_pre.size
  cnt = np.array([max(int(np.sum(a_pre == k)), 1) for k in range(3)], f32)
  p = cnt / f32(n)
  if p[1] < p0_min:
    d = f32(p0_min) - p[1]
    old_n = p[0]
    p[0] = p[0] - p[0] / (p[0] + p[2]) * d
    p[2] = p[2] - p[2] / ((p[0] if parity else old_n) + p[2]) * d
    p[1] = f32(p0_min)
  return p.astype(f32)


def assign(w, c, gamma, delta, p0_min, parity):
  """Entropy-constrained assignment; returns `(a, lam)`."""
  lv = np.array([-c[1], 0.0, c[0]], f32)
  d = (w[None] - lv.reshape((3,) + (1,) * w.ndim)) ** 2
  a_pre = np.argmin(d, axis=0)
  p = pmf(a_pre, p0_min, parity)
  info = -np.log2(p)
  m_n, m_p = abs(float(w.min())), abs(float(w.max()))
  lam_n = c[1] * (2 * m_n - c[1]) / (info[0] - info[1])
  lam_p = c[0] * (2 * m_p - c[0]) / (info[2] - info[1])
  lam = f32(gamma) * f32(delta) * f32(min(lam_n, lam_p))
  cost = d + lam * info.reshape((3,) + (1,) * w.ndim)
  return np.argmin(cost, axis=0).astype(np.int8), lam


def kernel(a: np.ndarray, c: np.ndarray) -> np.ndarray:
  """`q = w_p·[a==2] − w_n·[a==0]`."""
  return np.where(a == 2, c[0], np.where(a == 0, -c[1], 0.0)).astype(f32)


class ReferenceEC2T:
  """The original step order for a dict of ternary layers (docs/algorithm.md §2–5).

  Args:
    weights: `{name: pretrained kernel}` (float32 arrays).
    gamma, init_scale, sustain, p0_min, floor_std: hyperparameters of docs/algorithm.md §3–4.
    latent_lr, centroid_lr: Adam learning rates.
    parity: reproduce the original's quirks.
  """

  def __init__(
    self,
    weights,
    *,
    gamma=0.15,
    init_scale=0.3,
    sustain=0.05,
    p0_min=0.5,
    floor_std=0.675,
    latent_lr=1e-4,
    centroid_lr=1e-5,
    parity=False,
  ):
    self.gamma, self.sustain, self.p0_min, self.floor_std = gamma, sustain, p0_min, floor_std
    self.parity = parity
    self.latent = {k: np.array(v, f32) for k, v in weights.items()}
    self.c_latent = {
      k: np.array([init_scale * abs(v.max()), init_scale * abs(v.min())], f32)
      for k, v in self.latent.items()
    }
    self.c = {k: snap(v) for k, v in self.c_latent.items()}
    self.a = {k: nearest(self.latent[k], self.c[k]) for k in self.latent}
    self.opt_w = {k: Adam(latent_lr) for k in self.latent}
    self.opt_c = {k: Adam(centroid_lr) for k in self.latent}
    self.centroid_lr = centroid_lr
    self.n_max = max(v.size for v in self.latent.values())
    self.frozen = False

  def kernels(self) -> dict[str, np.ndarray]:
    """The ternary kernels of the forward pass."""
    return {k: kernel(self.a[k], self.c[k]) for k in self.latent}

  def freeze(self) -> None:
    """Switches to the frozen phase with fresh centroid optimizers."""
    self.frozen = True
    self.opt_c = {k: Adam(self.centroid_lr) for k in self.latent}

  def step(self, grads: dict[str, np.ndarray]) -> None:
    """One training step given `∂L/∂q` per layer."""
    for k, g in grads.items():
      g = np.asarray(g, f32)
      a, c = self.a[k], self.c[k]
      pos, neg = a == 2, a == 0
      d_w = np.where(pos, c[0] * g, np.where(neg, c[1] * g, g)).astype(f32)
      g_wp = f32(np.sum(np.where(pos, g, 0.0), dtype=f32))
      s_neg = f32(np.sum(np.where(neg, g, 0.0), dtype=f32))
      g_wn = s_neg if self.parity else -s_neg
      if not self.frozen:
        self.latent[k] = self.opt_w[k].step(self.latent[k], d_w)
      c_lat = self.opt_c[k].step(self.c_latent[k], np.array([g_wp, g_wn], f32))
      w = self.latent[k]
      t = f32(self.floor_std) * f32(np.std(w, ddof=1)) if w.size > 1 else f32(0)
      self.c_latent[k] = np.maximum(c_lat, t).astype(f32)
      self.c[k] = snap(self.c_latent[k])
      if not self.frozen:
        delta = (w.size / self.n_max + self.sustain) / (1 + self.sustain)
        self.a[k], _ = assign(w, self.c[k], self.gamma, delta, self.p0_min, self.parity)
