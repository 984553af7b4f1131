"""Compact PyTorch reference models, used only by the conversion parity tests.

Each module reproduces the parameter names and the eval-mode forward pass of a
published PyTorch implementation, written from the papers' descriptions:

* ``LeNet5``: conv(6@5x5, pad 2) → ReLU → maxpool → conv(16@5x5) → ReLU →
  maxpool → fc 120 → fc 84 → fc classes (the EC2T MNIST model).
* ``CifarResNet``: He et al. 2016 CIFAR ResNets (6n+2 layers) with the
  parameter-free option-A shortcut (subsample by 2, zero-pad channels).
* ``MicroNet``: the pyramidal-order residual net of docs/algorithm.md §8.
* ``ResNet``: the torchvision ImageNet ResNets (v1.5: stride on the 3x3 conv).
* ``EfficientNet``: the ``efficientnet_pytorch`` parameter layout (``_conv_stem``,
  ``_blocks.{i}._depthwise_conv``, ...), symmetric or TF-"SAME" padding.

This file imports torch at module level; import it only after
``pytest.importorskip('torch')``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------
# LeNet-5


class LeNet5(nn.Module):
  """LeNet-5 with ReLU and max pooling for 28x28 grayscale input."""

  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
    self.conv2 = nn.Conv2d(6, 16, 5)
    self.fc1 = nn.Linear(16 * 5 * 5, 120)
    self.fc2 = nn.Linear(120, 84)
    self.fc3 = nn.Linear(84, num_classes)

  def forward(self, x):
    """Logits for a batch of NCHW images."""
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = torch.flatten(x, 1)  # (c, h, w) order.
    x = F.relu(self.fc1(x))
    x = F.relu(self.fc2(x))
    return self.fc3(x)


# ---------------------------------------------------------------------------
# CIFAR ResNets (option A)


class _CifarBasicBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.pad = stride != 1 or in_planes != planes
    self.pad_channels = planes // 4

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x
    if self.pad:
      p = self.pad_channels
      shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))
    return F.relu(out + shortcut)


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2) with option-A shortcuts and widths 16/32/64."""

  def __init__(self, depth: int = 20, num_classes: int = 10):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    in_planes = 16
    for i, planes in enumerate((16, 32, 64), start=1):
      blocks = []
      for j in range(n):
        stride = 2 if (i > 1 and j == 0) else 1
        blocks.append(_CifarBasicBlock(in_planes, planes, stride))
        in_planes = planes
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.linear = nn.Linear(64, num_classes)

  def forward(self, x):
    """Logits for a batch of NCHW images."""
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = x.mean(dim=(2, 3))
    return self.linear(x)


# ---------------------------------------------------------------------------
# MicroNet (docs/algorithm.md §8)


def round_filters(filters: int, width_mult: float, divisor: int = 8) -> int:
  """EfficientNet channel rounding (docs/algorithm.md §8)."""
  scaled = filters * width_mult
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


class _MicroBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes)
    self.dropout = nn.Dropout(0.2)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )
    else:
      self.shortcut = nn.Sequential()

  def forward(self, x):
    out = self.conv1(self.bn1(x))
    out = self.dropout(F.relu(self.bn2(out)))
    out = self.bn3(self.conv2(out))
    return out + self.shortcut(x)


class MicroNet(nn.Module):
  """Pyramidal-order CIFAR ResNet: 3 stages of ``ceil(7·depth_mult)`` blocks."""

  def __init__(self, depth_mult: float = 1.0, width_mult: float = 1.0, num_classes: int = 10):
    super().__init__()
    n = int(math.ceil(7 * depth_mult))
    stem = round_filters(16, width_mult)
    self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    in_planes = stem
    for i, base in enumerate((16, 32, 64), start=1):
      planes = round_filters(base, width_mult)
      blocks = []
      for j in range(n):
        stride = 2 if (i > 1 and j == 0) else 1
        blocks.append(_MicroBlock(in_planes, planes, stride))
        in_planes = planes
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    """Logits for a batch of NCHW images."""
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = F.relu(x).mean(dim=(2, 3))
    return self.linear(x)


# ---------------------------------------------------------------------------
# torchvision-layout ImageNet ResNets


class _BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class _Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    out_planes = planes * 4
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.downsample = None
    if stride != 1 or in_planes != out_planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
        nn.BatchNorm2d(out_planes),
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


_RESNET_STAGES = {
  18: (_BasicBlock, (2, 2, 2, 2)),
  34: (_BasicBlock, (3, 4, 6, 3)),
  50: (_Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
  """torchvision ResNet-18/34/50 (same parameter names and forward pass)."""

  def __init__(self, depth: int = 18, num_classes: int = 1000):
    super().__init__()
    block, stages = _RESNET_STAGES[depth]
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    in_planes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), stages, strict=True), start=1):
      blocks = []
      for j in range(n):
        stride = 2 if (i > 1 and j == 0) else 1
        blocks.append(block(in_planes, planes, stride))
        in_planes = planes * block.expansion
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.fc = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    """Logits for a batch of NCHW images."""
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------
# EfficientNet, efficientnet_pytorch parameter layout

# (repeats, kernel, stride, expand_ratio, in, out) of the seven B0 stages; SE ratio 0.25.
_EFFNET_STAGES = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)

# (width, depth) coefficients of B0..B7.
EFFNET_COEFFICIENTS = {
  'efficientnet_b0': (1.0, 1.0),
  'efficientnet_b1': (1.0, 1.1),
  'efficientnet_b2': (1.1, 1.2),
  'efficientnet_b3': (1.2, 1.4),
  'efficientnet_b4': (1.4, 1.8),
  'efficientnet_b5': (1.6, 2.2),
  'efficientnet_b6': (1.8, 2.6),
  'efficientnet_b7': (2.0, 3.1),
}


class _Conv(nn.Conv2d):
  """Conv2d with either symmetric ``k // 2`` padding or TF "SAME" padding."""

  def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, same=False):
    super().__init__(cin, cout, k, stride, 0 if same else k // 2, groups=groups, bias=bias)
    self.same = same

  def forward(self, x):
    if self.same:
      pads = []
      for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
      (top, bottom), (left, right) = pads
      x = F.pad(x, (left, right, top, bottom))
    return super().forward(x)


class _MBConv(nn.Module):
  def __init__(self, cin, cout, k, stride, expand, same, eps):
    super().__init__()
    mid = cin * expand
    self.expand = expand != 1
    if self.expand:
      self._expand_conv = _Conv(cin, mid, 1, same=same)
      self._bn0 = nn.BatchNorm2d(mid, eps=eps)
    self._depthwise_conv = _Conv(mid, mid, k, stride, groups=mid, same=same)
    self._bn1 = nn.BatchNorm2d(mid, eps=eps)
    squeezed = max(1, int(cin * 0.25))
    self._se_reduce = _Conv(mid, squeezed, 1, bias=True, same=same)
    self._se_expand = _Conv(squeezed, mid, 1, bias=True, same=same)
    self._project_conv = _Conv(mid, cout, 1, same=same)
    self._bn2 = nn.BatchNorm2d(cout, eps=eps)
    self.skip = stride == 1 and cin == cout

  def forward(self, inputs):
    x = inputs
    if self.expand:
      x = F.silu(self._bn0(self._expand_conv(x)))
    x = F.silu(self._bn1(self._depthwise_conv(x)))
    s = x.mean(dim=(2, 3), keepdim=True)
    s = self._se_expand(F.silu(self._se_reduce(s)))
    x = torch.sigmoid(s) * x
    x = self._bn2(self._project_conv(x))
    return x + inputs if self.skip else x


class EfficientNet(nn.Module):
  """EfficientNet-B0..B7 with the ``efficientnet_pytorch`` parameter names."""

  def __init__(
    self,
    name: str = 'efficientnet_b0',
    num_classes: int = 1000,
    same_padding: bool = False,
    eps: float = 1e-3,
  ):
    super().__init__()
    width, depth = EFFNET_COEFFICIENTS[name]
    stem = round_filters(32, width)
    self._conv_stem = _Conv(3, stem, 3, 2, same=same_padding)
    self._bn0 = nn.BatchNorm2d(stem, eps=eps)
    blocks = []
    for repeats, k, stride, expand, cin, cout in _EFFNET_STAGES:
      cin, cout = round_filters(cin, width), round_filters(cout, width)
      for r in range(int(math.ceil(depth * repeats))):
        blocks.append(
          _MBConv(
            cin if r == 0 else cout,
            cout,
            k,
            stride if r == 0 else 1,
            expand,
            same_padding,
            eps,
          )
        )
    self._blocks = nn.ModuleList(blocks)
    head = round_filters(1280, width)
    self._conv_head = _Conv(cout, head, 1, same=same_padding)
    self._bn1 = nn.BatchNorm2d(head, eps=eps)
    self._fc = nn.Linear(head, num_classes)

  def forward(self, x):
    """Logits for a batch of NCHW images."""
    x = F.silu(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    x = F.silu(self._bn1(self._conv_head(x)))
    return self._fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Fills every parameter and BN running statistic with random values, in place.

  Weights get a fan-in-scaled normal, BN scale ``U(0.5, 1.5)``, bias and
  running mean ``N(0, 0.1²)``, running var ``U(0.5, 1.5)``, so that eval-mode
  activations stay O(1) through deep nets while every statistic matters.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
      elif isinstance(module, (nn.Conv2d, nn.Linear)):
        w = module.weight
        fan_in = w[0].numel()
        w.copy_(torch.randn(w.shape, generator=gen) * math.sqrt(1.0 / fan_in))
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
  return model.eval()
