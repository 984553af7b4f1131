"""A small Vision Transformer for small images (MNIST, CIFAR).

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021 (arXiv 2010.11929), scaled down for 28x28 and
32x32 images. The layout, for ``(N, H, W, C)`` images and patch size ``p``:

* ``patch_embed``: the image cut into ``T = (H/p)·(W/p)`` non-overlapping
  ``p x p`` patches, each flattened in ``(ph, pw, c)`` order and projected by a
  Dense layer to ``width`` (the same map as a ``p x p`` convolution with stride
  ``p``: its HWIO kernel reshaped to ``(p·p·C, width)``);
* ``pos_embedding``: a learned ``(1, T, width)`` table added to the tokens; its
  size is taken from the input at ``init``, so a model initialised on 32x32
  images must be applied to 32x32 images;
* ``depth`` pre-LayerNorm encoder blocks ``blocks_{i}``:
  ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, where ``attn`` is
  multi-head self-attention with Dense projections ``query``, ``key``,
  ``value`` and ``out`` (each a 2-D ``(width, width)`` kernel with a bias), and
  ``mlp`` is ``fc1`` (``width → mlp_ratio·width``), exact GELU (erf, as
  PyTorch's ``nn.GELU()``), ``fc2`` (back to ``width``);
* ``norm`` (a final LayerNorm), mean pooling over the tokens (no class token:
  every token is a patch, so the network has no concatenation), and the
  classifier ``head``.

Everything is plain `jax.numpy` (``einsum``, `jax.nn.softmax`,
``jax.nn.gelu(approximate=False)``, `flax.linen.LayerNorm`), with no fused or
platform-specific attention, so the float32 network traces to standard lax
primitives only: ``dot_general``, ``add``, ``sub``, ``mul``, ``div``, ``neg``,
``max``, ``square``, ``exp``, ``erfc`` (the exact GELU is
``x·erfc(-x/√2)/2``), ``rsqrt``, ``reduce_max``, ``reduce_sum``, ``reshape``,
``transpose``, ``broadcast_in_dim``, ``stop_gradient`` and ``copy`` (plus
``convert_element_type`` with another ``dtype``); that is the network in
evaluation (``train=False``), where dropout is the identity. Dropout
(``dropout_rate``, default 0; training only) draws from the ``'dropout'`` rng
at four places: on the tokens after the position embedding is added, after
each block's attention (its ``out`` projection), and in each MLP after the
GELU and after ``fc2``.

Parameter count, with ``D = width``, ``M = mlp_ratio·D``, ``P = p·p·C``::

    (P + 1)·D  +  T·D  +  depth·(4·D² + 4·D  +  2·D·M + M + D  +  4·D)  +  2·D  +  (D + 1)·K

(patch embedding, position table, per block attention + MLP + two LayerNorms,
final LayerNorm, head for ``K`` classes): 138,890 for ``vit_tiny`` on 28x28x1
with 10 classes.

Which kernels are ternary: the trainer's default selection
(`ec2t_jax.masks.default_ternary_mask` with the traced call order,
``keep_first=True``, ``keep_last=True``) keeps the first kernel (``patch_embed``)
and the last (``head``) in full precision and ternarizes every other
``kernel``: ``blocks_{i}/attn/{query,key,value,out}/kernel`` and
``blocks_{i}/mlp/{fc1,fc2}/kernel``. Biases, LayerNorm scales and biases and
``pos_embedding`` are not kernels, so they always stay full precision. To
choose otherwise, set ``config.ec2t.ternary_pattern`` (a regex on leaf paths,
e.g. ``r'blocks_\\d+/mlp/fc\\d/kernel$'`` for the MLPs only) with
``config.ec2t.ternary_exclude`` (a regex of paths to leave out of it, e.g.
``'blocks_0/'``), or keep the default and name kernels to leave in full
precision with ``config.ec2t.keep_pattern`` (e.g. ``'(attn/out|blocks_3/)'``).
Note that the MNIST recipes set ``keep_first=False`` for LeNet-5; the ViT
recipe (``configs/mnist.py:vit``) sets it back to True.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ec2t_jax.models import layers

__all__ = ['EncoderBlock', 'MlpBlock', 'SelfAttention', 'ViT']

# ViT's initialisation: Xavier-uniform kernels and zero biases for the Dense layers,
# N(0, 0.02²) for the position embedding.
_dense_init = nn.initializers.xavier_uniform()
_pos_init = nn.initializers.normal(stddev=0.02)


class SelfAttention(nn.Module):
  """Multi-head self-attention with Dense ``query``, ``key``, ``value`` and ``out``.

  ``softmax(q·kᵀ/√d_head)·v`` per head, heads concatenated, then ``out``. The
  attention weights are computed in float32 whatever the computation dtype.

  Attributes:
    num_heads: number of heads; a positive divisor of the token width.
    dense: the network's Dense layer (dtypes and initialisers set).
    dropout: the network's Dropout (rate and train/eval mode set).
  """

  num_heads: int
  dense: layers.ModuleDef
  dropout: layers.ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends every token to every token.

    Args:
      x: tokens, shape ``(N, T, D)``.

    Returns:
      Tokens, shape ``(N, T, D)``.

    Raises:
      ValueError: if ``num_heads`` is not a positive divisor of ``D``.
    """
    n, t, d = x.shape
    if self.num_heads <= 0 or d % self.num_heads:
      raise ValueError(
        f'num_heads {self.num_heads} must divide the token width {d}; valid: '
        f'{[k for k in range(1, d + 1) if d % k == 0]}'
      )
    head_dim = d // self.num_heads

    def heads(y):  # (N, T, D) -> (N, H, T, D/H)
      return y.reshape(n, t, self.num_heads, head_dim).transpose(0, 2, 1, 3)

    q = heads(self.dense(d, name='query')(x))
    k = heads(self.dense(d, name='key')(x))
    v = heads(self.dense(d, name='value')(x))
    logits = jnp.einsum('nhqc,nhkc->nhqk', q, k) * (head_dim**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum('nhqk,nhkc->nhqc', weights, v)
    y = y.transpose(0, 2, 1, 3).reshape(n, t, d)
    return self.dropout()(self.dense(d, name='out')(y))


class MlpBlock(nn.Module):
  """``fc1`` → GELU (exact, erf) → ``fc2``, back to the input width.

  Attributes:
    hidden: width of ``fc1``'s output.
    dense: the network's Dense layer.
    dropout: the network's Dropout.
  """

  hidden: int
  dense: layers.ModuleDef
  dropout: layers.ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the MLP to every token.

    Args:
      x: tokens, shape ``(N, T, D)``.

    Returns:
      Tokens, shape ``(N, T, D)``.
    """
    y = jax.nn.gelu(self.dense(self.hidden, name='fc1')(x), approximate=False)
    y = self.dense(x.shape[-1], name='fc2')(self.dropout()(y))
    return self.dropout()(y)


class EncoderBlock(nn.Module):
  """A pre-LayerNorm Transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dense: the network's Dense layer.
    norm: the network's LayerNorm.
    dropout: the network's Dropout.
  """

  num_heads: int
  mlp_dim: int
  dense: layers.ModuleDef
  norm: layers.ModuleDef
  dropout: layers.ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: tokens, shape ``(N, T, D)``.

    Returns:
      Tokens, shape ``(N, T, D)``.
    """
    attn = SelfAttention(self.num_heads, self.dense, self.dropout, name='attn')
    x = x + attn(self.norm(name='norm1')(x))
    mlp = MlpBlock(self.mlp_dim, self.dense, self.dropout, name='mlp')
    return x + mlp(self.norm(name='norm2')(x))


class ViT(nn.Module):
  """A Vision Transformer for small images (see the module docstring for the layout).

  The defaults (``vit_tiny``) suit 28x28x1 MNIST: 7x7 patches (16 tokens),
  width 64, 4 blocks of 4 heads, MLP ratio 2; 138,890 parameters for 10
  classes. Any image whose sides are multiples of ``patch_size`` works (e.g.
  32x32x3 with ``patch_size=4``).

  Attributes:
    num_classes: number of output logits.
    patch_size: side of the square patches; must divide the image's height and width.
    width: token width ``D``.
    depth: number of encoder blocks.
    num_heads: attention heads per block; a positive divisor of ``width``.
    mlp_ratio: the MLP's hidden width is ``mlp_ratio · width``.
    dropout_rate: dropout after the position embedding, after each attention and
      in each MLP (training only; see the module docstring).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    param_dtype: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = ViT(num_classes=10)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> variables = model.init(jax.random.key(0), x)
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
  """

  num_classes: int = 10
  patch_size: int = 7
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 2
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self, shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
      raise ValueError(f'ViT takes NHWC images, got an input of shape {shape}')
    _, h, w, _ = shape
    p = self.patch_size
    if p <= 0 or h % p or w % p:
      raise ValueError(
        f'patch_size {p} must be positive and divide the image height and width, '
        f'got an image of {h}x{w}'
      )
    if self.num_heads <= 0 or self.width % self.num_heads:
      raise ValueError(
        f'num_heads {self.num_heads} must divide width {self.width}; valid: '
        f'{[k for k in range(1, self.width + 1) if self.width % k == 0]}'
      )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits for a batch of NHWC images.

    Args:
      x: images, shape ``(N, H, W, C)`` with ``H`` and ``W`` multiples of ``patch_size``.
      train: apply dropout (drawn from the ``'dropout'`` rng) if ``dropout_rate > 0``.

    Returns:
      Logits, shape ``(N, num_classes)``, dtype ``dtype``.

    Raises:
      ValueError: if the image sides are not multiples of ``patch_size``, or
        ``num_heads`` is not a positive divisor of ``width``.
    """
    self._check(x.shape)
    dense = layers.with_dtypes(self, nn.Dense, kernel_init=_dense_init)
    norm = layers.with_dtypes(self, nn.LayerNorm, epsilon=1e-6)
    dropout = functools.partial(nn.Dropout, rate=self.dropout_rate, deterministic=not train)

    n, h, w, c = x.shape
    p = self.patch_size
    # (N, H, W, C) -> (N, H/p, p, W/p, p, C) -> (N, H/p, W/p, p, p, C) -> (N, T, p·p·C).
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // p) * (w // p), p * p * c)
    x = dense(self.width, name='patch_embed')(x)
    pos = self.param('pos_embedding', _pos_init, (1, *x.shape[1:]), self.param_dtype)
    x = x + pos.astype(x.dtype)
    x = dropout()(x)
    for i in range(self.depth):
      x = EncoderBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_ratio * self.width,
        dense=dense,
        norm=norm,
        dropout=dropout,
        name=f'blocks_{i}',
      )(x)
    x = norm(name='norm')(x)
    x = jnp.mean(x, axis=1)
    return dense(self.num_classes, name='head')(x)
