"""CBAM: a channel gate, then a spatial gate, on the same feature map.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018
(arXiv:1807.06521). Official code: Jongchan/attention-module (``MODELS/cbam.py``).

SE asks *which* channels matter; CBAM also asks *where*. It applies two gates one after the
other (Eq. 1 of the paper):

* a channel gate ``M_c`` (:class:`ChannelGate`), like SE's but fed by both the average- and the
  max-pooled descriptor through one shared MLP;
* a spatial gate ``M_s`` (:class:`SpatialGate`), a 7x7 convolution over two maps that summarise
  the channels at each pixel (their mean and their max).

The paper compares the three arrangements (channel first, spatial first, both in parallel;
Table 4) and keeps channel first, which is what :class:`CBAM` computes. Like SE it gates the
residual branch of a block *before* the addition with the shortcut (Fig. 3 of the paper, and the
official ``BasicBlock``/``Bottleneck``); :mod:`attn_lib.models.resnet` places it there.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from ._checks import check_feature_map, check_positive, reduced_channels

__all__ = ["CBAM", "ChannelGate", "SpatialGate"]

#: Orders of the two channel-pooled maps fed to the spatial convolution: the paper writes
#: ``[AvgPool(F); MaxPool(F)]``; the official code concatenates max first.
POOL_ORDERS = ("mean_max", "max_mean")

#: Momentum of the spatial gate's BatchNorm in the official code (``BasicConv``): 0.01, a
#: slower running average than PyTorch's default 0.1.
OFFICIAL_BN_MOMENTUM = 0.01


class ChannelGate(nn.Module):
    r"""CBAM's channel attention: one shared MLP on the average- and the max-pooled descriptor.

    For :math:`F \in \mathbb{R}^{C \times H \times W}` (Eq. 2 of the paper, with
    :math:`\delta` = ReLU and :math:`\sigma` = sigmoid):

    .. math::

        M_c(F) = \sigma\big(W_1 \delta(W_0 F^c_{avg}) + W_1 \delta(W_0 F^c_{max})\big),
        \qquad W_0 \in \mathbb{R}^{\frac{C}{r} \times C},\ W_1 \in \mathbb{R}^{C \times \frac{C}{r}}

    where :math:`F^c_{avg}, F^c_{max} \in \mathbb{R}^C` are the global average and max pools.
    The *same* :math:`W_0, W_1` (``mlp[0]``, ``mlp[2]``, ``nn.Linear`` layers) serve both
    descriptors; the gate is applied as ``F' = M_c(F) * F``.

    Choices: biases in the MLP by default (``bias=True``), as in the official code (the paper's
    equation has none; many ports drop them). A reduction that leaves no hidden unit (``C < r``)
    raises ``ValueError``.

    Args:
        channels: ``C``, the number of channels of the input.
        reduction: ``r``, the MLP's reduction ratio (16 in the paper).
        bias: whether the MLP's two layers have biases.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``y`` ``[B, C, H, W]``; attention ``M_c``: ``[B, C, 1, 1]``.
    """

    def __init__(self, channels: int, reduction: float = 16, bias: bool = True):
        super().__init__()
        self.hidden = reduced_channels(channels, reduction, type(self).__name__)
        self.channels = channels
        self.reduction = reduction
        self.mlp = nn.Sequential(
            nn.Linear(channels, self.hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(self.hidden, channels, bias=bias),
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``M_c``: ``[B, C, H, W] -> [B, C, 1, 1]``, values in (0, 1). Does not check ``x``."""
        # Both descriptors go through the shared MLP in one call (stacked on a leading axis of
        # size 2), then the two outputs are summed: the same as two calls, half the launches.
        pooled = torch.stack((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))))  # [2, B, C]
        return torch.sigmoid(self.mlp(pooled).sum(dim=0))[:, :, None, None]

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``y = x * M_c(x)``; with ``return_attention=True`` also ``M_c``, ``[B, C, 1, 1]``."""
        check_feature_map(x, self.channels, type(self).__name__)
        gate = self.attention(x)
        y = x * gate
        return (y, gate) if return_attention else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, hidden={self.hidden}"


class SpatialGate(nn.Module):
    r"""CBAM's spatial attention: a 7x7 convolution over the channel-wise mean and max maps.

    For :math:`F' \in \mathbb{R}^{C \times H \times W}` (Eq. 3 of the paper):

    .. math::

        M_s(F') = \sigma\big(f^{k \times k}([F'^s_{avg}; F'^s_{max}])\big) \in
            \mathbb{R}^{1 \times H \times W}

    where :math:`F'^s_{avg}, F'^s_{max} \in \mathbb{R}^{1 \times H \times W}` are the mean and
    the max over the channels at each pixel, stacked as the convolution's two input channels,
    and :math:`f^{k \times k}` is a convolution with ``k // 2`` zero padding (so ``H, W`` are
    kept). The gate is applied as ``F'' = M_s(F') * F'``.

    Paper form (the default) and the official code's form:

    * ``bn=False``: the convolution alone, with a bias (the paper's equation shows none; one
      scalar lets the gate learn its offset, which the BatchNorm's shift provides otherwise).
    * ``bn=True``: convolution without bias, then ``BatchNorm2d(1)`` as in the official
      ``BasicConv`` (eps 1e-5, momentum 0.01). The official ResNet (``MODELS/model_resnet.py``,
      its initialisation loop over the state dict, not ``cbam.py`` itself) sets this BatchNorm's
      weight and bias to 0, so the spatial gate starts at exactly ``sigmoid(0) = 0.5`` everywhere;
      this module does the same. (That loop also zeroes every other bias in the network, the
      MLP's included, and re-initialises convolutions with Kaiming-normal fan-out; those
      network-wide choices are not reproduced here.) Note the zero weight also blocks the
      gradient to the convolution until the BatchNorm weight has moved.
    * ``pool_order="mean_max"`` stacks ``[mean; max]`` as the paper writes it; ``"max_mean"``
      stacks ``[max; mean]`` as the official ``ChannelPool`` does. For the same weights the two
      give different gates; a checkpoint trained with one order needs its convolution's two
      input channels swapped to be used with the other.

    Args:
        kernel_size: ``k``, odd and positive (7 in the paper, which found 7 better than 3).
        bn: add the official code's BatchNorm after the convolution.
        pool_order: ``"mean_max"`` (paper) or ``"max_mean"`` (official code).

    Shapes: ``x`` ``[B, C, H, W]`` (any ``C``) -> ``y`` ``[B, C, H, W]``; attention ``M_s``:
    ``[B, 1, H, W]``.
    """

    def __init__(self, kernel_size: int = 7, bn: bool = False, pool_order: str = "mean_max"):
        super().__init__()
        name = type(self).__name__
        check_positive(kernel_size, "kernel_size", name)
        if kernel_size % 2 == 0:
            # With an even kernel no padding keeps H x W: the gate would not line up with x.
            raise ValueError(f"{name}: expected an odd kernel_size, got {kernel_size}")
        if pool_order not in POOL_ORDERS:
            raise ValueError(f"{name}: expected pool_order in {POOL_ORDERS}, got {pool_order!r}")
        self.kernel_size = kernel_size
        self.pool_order = pool_order
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not bn)
        if bn:
            self.bn = nn.BatchNorm2d(1, momentum=OFFICIAL_BN_MOMENTUM)
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        else:
            self.bn = nn.Identity()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``M_s``: ``[B, C, H, W] -> [B, 1, H, W]``, values in (0, 1). Does not check ``x``."""
        mean_map = x.mean(dim=1, keepdim=True)
        max_map = x.amax(dim=1, keepdim=True)
        maps = (mean_map, max_map) if self.pool_order == "mean_max" else (max_map, mean_map)
        return torch.sigmoid(self.bn(self.conv(torch.cat(maps, dim=1))))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``y = x * M_s(x)``; with ``return_attention=True`` also ``M_s``, ``[B, 1, H, W]``."""
        # Any channel count is fine here; only the rank and the dtype are checked.
        channels = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else -1
        check_feature_map(x, channels, type(self).__name__)
        gate = self.attention(x)
        y = x * gate
        return (y, gate) if return_attention else y

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, pool_order={self.pool_order!r}"


class CBAM(nn.Module):
    r"""Convolutional Block Attention Module: channel gate, then spatial gate (Eq. 1).

    .. math::

        F' = M_c(F) \otimes F, \qquad F'' = M_s(F') \otimes F'

    with :math:`M_c` from :class:`ChannelGate` and :math:`M_s` from :class:`SpatialGate`
    (see those for the equations). The spatial gate is computed from the *channel-gated* map
    :math:`F'`, not from the input.

    The defaults are the paper's form. The official code's form is
    ``CBAM(C, spatial_bn=True, pool_order="max_mean")`` (its MLP has biases, the default
    ``bias=True`` here too). timm's ``CbamModule`` is ``CBAM(C, bias=False, spatial_bn=True)``
    with ``hidden`` rounded its own way.

    Args:
        channels: ``C``, the number of channels of the input.
        reduction: ``r`` of the channel gate's MLP (16 in the paper); ``C < r`` raises
            ``ValueError``.
        kernel_size: the spatial gate's convolution size (7 in the paper), odd.
        spatial_bn: BatchNorm after the spatial convolution, zero-initialised, as in the
            official code.
        pool_order: ``"mean_max"`` (paper) or ``"max_mean"`` (official code).
        bias: biases in the channel gate's MLP.

    Shapes:
        * ``x``: ``[B, C, H, W]``
        * output ``y``: ``[B, C, H, W]``, ``y = (x * channel) * spatial``
        * attention (with ``return_attention=True``): a dict
          ``{"channel": M_c [B, C, 1, 1], "spatial": M_s [B, 1, H, W]}``, values in (0, 1).

    Parameters: ``2 C^2 / r`` (+ ``C + C/r`` biases) for the channel gate, ``2 k^2 + 1`` for
    the spatial gate (``2 k^2 + 2`` with its BatchNorm).

    >>> cbam = CBAM(32)
    >>> y, att = cbam(torch.randn(2, 32, 8, 8), return_attention=True)
    >>> att["channel"].shape, att["spatial"].shape
    (torch.Size([2, 32, 1, 1]), torch.Size([2, 1, 8, 8]))
    """

    def __init__(self, channels: int, reduction: float = 16, kernel_size: int = 7,
                 spatial_bn: bool = False, pool_order: str = "mean_max", bias: bool = True):
        super().__init__()
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction, bias=bias)
        self.spatial_gate = SpatialGate(kernel_size, bn=spatial_bn, pool_order=pool_order)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``[B, C, H, W] -> [B, C, H, W]``; with ``return_attention=True`` also
        ``{"channel": [B, C, 1, 1], "spatial": [B, 1, H, W]}``, ``y == (x * channel) * spatial``."""
        check_feature_map(x, self.channels, type(self).__name__)
        channel = self.channel_gate.attention(x)
        refined = x * channel
        spatial = self.spatial_gate.attention(refined)
        y = refined * spatial
        return (y, {"channel": channel, "spatial": spatial}) if return_attention else y
