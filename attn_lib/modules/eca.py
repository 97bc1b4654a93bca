"""Efficient Channel Attention: SE's channel gate without the bottleneck, in ``k`` parameters.

Wang, Wu, Zhu, Li, Zuo, Hu, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
Networks", CVPR 2020 (arXiv:1910.03151).

The paper argues that SE's bottleneck (reducing ``C`` to ``C/r`` and back) hurts: the gate of a
channel should come from that channel's own descriptor directly, plus a little interaction with
its neighbours. ECA therefore replaces the two fully connected layers by one 1-D convolution of
size ``k`` that slides along the channel axis of the pooled vector: each channel's gate sees
itself and ``k // 2`` channels on either side, with the same ``k`` weights for every channel.
The whole module has ``k`` parameters (3 to 9 in practice), against ``2 C^2 / r`` for SE.

Like SE it gates the residual branch of a block *before* the addition with the shortcut (the
official ``ECABasicBlock`` applies it right after the branch's last batch norm);
:mod:`attn_lib.models.resnet` places it there.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ._checks import check_feature_map, check_positive

__all__ = ["EfficientChannelAttention", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    r"""The paper's adaptive kernel size, Eq. 12: :math:`k = |\log_2(C)/\gamma + b/\gamma|_{odd}`.

    :math:`|t|_{odd}` is the odd number nearest to :math:`t`. It is computed as "truncate
    :math:`t` to an integer, add one if that is even", which is the nearest odd number with ties
    (``t`` an even integer, e.g. ``t = 4`` for ``C = 128``) going up: ``4 -> 5``. It is the rule
    of the code listing in the paper's Fig. 3 and of timm's ``EcaModule``.

    With the defaults ``gamma = 2, b = 1``: 64, 128, 256, 512 channels give 3, 5, 5, 5.
    Fewer than 8 channels give ``k = 1`` (each channel gated by its own descriptor alone);
    timm clamps ``k`` to at least 3 there, the formula does not.

    Args:
        channels: ``C``, a positive integer.
        gamma, b: the mapping's parameters (2 and 1 in the paper).

    Returns:
        the odd kernel size ``k >= 1``.
    """
    name = "eca_kernel_size"
    check_positive(channels, "channels", name)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"{name}: expected gamma to be a positive number, got {gamma!r}")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
        raise ValueError(f"{name}: expected b to be a finite number, got {b!r}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 == 1 else t + 1


class EfficientChannelAttention(nn.Module):
    r"""The ECA module: global average pooling, a 1-D convolution across channels, a sigmoid.

    For a feature map :math:`x \in \mathbb{R}^{C \times H \times W}`:

    .. math::

        y_c &= \frac{1}{HW} \sum_{i,j} x_c(i, j) \qquad (y \in \mathbb{R}^C)\\
        \omega_c &= \sigma\Big(\sum_{j=1}^{k} w_j\, y_{c + j - 1 - \lfloor k/2 \rfloor}\Big)
            \qquad (\omega = \sigma(\mathrm{C1D}_k(y)),\ y_{c'} = 0 \text{ outside } 1..C)\\
        \tilde{x}_c &= \omega_c\, x_c

    The output is the gated input ``x * omega``, not the gate ``omega`` (a snippet circulating
    with the course's seed material returns the gate by mistake).

    Choices:

    * ``kernel_size=None`` (default) computes ``k`` from ``C`` with the paper's adaptive rule,
      :func:`eca_kernel_size`. The official code (BangguWu/ECANet, ``models/eca_module.py``)
      never computes it: ``eca_layer`` takes ``k_size=3`` by default, ``eca_resnet18`` hard-codes
      ``[3, 3, 3, 3]`` whatever it is passed, and the released ImageNet weights use per-stage
      sizes chosen by hand (``eca_resnet50_k3557``, ``eca_resnet101_k3357``); see ECANet issues
      #24 and #46. Pass ``kernel_size=3`` to reproduce the official default.
    * The convolution has no bias, as in the official code (the paper's module has ``k``
      parameters), and keeps PyTorch's default initialisation.
    * Zero padding at both ends of the channel axis (``k // 2`` each side), as in the official
      code; the first and last channels therefore see fewer neighbours.

    Args:
        channels: ``C``, the number of channels of the input.
        kernel_size: ``None`` for the adaptive ``k``, or a fixed positive odd ``k``.
        gamma, b: parameters of the adaptive rule (2 and 1 in the paper); ignored when
            ``kernel_size`` is given.

    Shapes:
        * ``x``: ``[B, C, H, W]``
        * output ``y``: ``[B, C, H, W]``, ``y = x * omega``
        * attention ``omega`` (with ``return_attention=True``): ``[B, C, 1, 1]``, in (0, 1)

    >>> eca = EfficientChannelAttention(128)
    >>> eca.kernel_size
    5
    >>> y, w = eca(torch.randn(2, 128, 4, 4), return_attention=True)
    >>> w.shape
    torch.Size([2, 128, 1, 1])
    """

    def __init__(self, channels: int, kernel_size: Optional[int] = None, gamma: float = 2,
                 b: float = 1):
        super().__init__()
        name = type(self).__name__
        check_positive(channels, "channels", name)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, b)
        else:
            check_positive(kernel_size, "kernel_size", name)
            if kernel_size % 2 == 0:
                # An even kernel cannot be centred on a channel: the output would be shifted
                # by half a channel and one element shorter or longer than the input.
                raise ValueError(f"{name}: expected an odd kernel_size, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``[B, C, H, W] -> [B, C, H, W]``; with ``return_attention=True`` also the gate
        ``omega``, ``[B, C, 1, 1]``, such that ``y == x * omega``."""
        check_feature_map(x, self.channels, type(self).__name__)
        # The pooled channels become the *length* of a one-channel 1-D signal: [B, 1, C].
        y = x.mean(dim=(2, 3)).unsqueeze(1)
        omega = torch.sigmoid(self.conv(y)).view(x.shape[0], self.channels, 1, 1)
        out = x * omega
        return (out, omega) if return_attention else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
