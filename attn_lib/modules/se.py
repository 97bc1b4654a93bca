"""Squeeze-and-Excitation: a learned, input-dependent gate per channel.

Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv:1709.01507; extended in
TPAMI 2020 with Albanie and Wu).

A convolution mixes channels only through its learned, input-independent weights. An SE block
lets the network re-weight its channels *for each input*: it summarises every channel by one
number (squeeze), passes that vector through a small bottleneck MLP that models how the channels
depend on each other (excitation), and multiplies each channel by the resulting gate in (0, 1).

In a residual network it sits on the residual branch, after the branch's last batch norm and
*before* the addition with the shortcut, ``out = relu(shortcut(x) + SE(branch(x)))`` (Fig. 3 of
the paper). Gating after the addition would also scale the identity path, which residual
learning keeps untouched. :mod:`attn_lib.models.resnet` places it there.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn
import torch.nn.functional as F

from ._checks import check_feature_map, reduced_channels

__all__ = ["SqueezeExcitation"]


class SqueezeExcitation(nn.Module):
    r"""The SE block: squeeze by global average pooling, excite with a bottleneck MLP, rescale.

    For a feature map :math:`u \in \mathbb{R}^{C \times H \times W}`, with :math:`\delta` = ReLU
    and :math:`\sigma` = sigmoid (Eqs. 2-4 of the paper):

    .. math::

        z_c &= \frac{1}{HW} \sum_{i=1}^{H} \sum_{j=1}^{W} u_c(i, j)
            &&\text{(squeeze, } z \in \mathbb{R}^C)\\
        s &= \sigma\big(W_2\, \delta(W_1 z + b_1) + b_2\big)
            &&\text{(excitation, } W_1 \in \mathbb{R}^{\frac{C}{r} \times C},\
              W_2 \in \mathbb{R}^{C \times \frac{C}{r}})\\
        \tilde{x}_c &= s_c \, u_c &&\text{(scale)}

    (:math:`b_1, b_2` are absent with ``bias=False``; the paper's equation omits them.) The
    output is the *gated input* ``x * s``, not the gate ``s`` itself; the gate is what
    ``return_attention=True`` adds.

    Choices:

    * The two fully connected layers are ``nn.Linear`` (``fc1`` is :math:`W_1`, ``fc2`` is
      :math:`W_2`), applied to the pooled vector ``z`` of shape ``[B, C]``, so their weights have
      the paper's shapes. Many ports (timm's ``SEModule`` among them) use 1x1 convolutions on a
      ``[B, C, 1, 1]`` tensor instead; the two are the same map, with weights of shape
      ``[C/r, C]`` versus ``[C/r, C, 1, 1]``.
    * Biases: the original SENet (Caffe) has a bias in both layers, and so does this module by
      default (``bias=True``); many PyTorch ports drop them (``bias=False``). They add
      ``C + C/r`` parameters per block.
    * The hidden width is ``C // r``; a reduction that leaves no hidden unit (``C < r``) raises
      ``ValueError`` instead of building an empty layer whose output is a constant.
    * Weights keep PyTorch's default initialisation. SE does not start as the identity: its
      first gates are input-dependent values around 0.5, so a fresh block roughly halves the
      branch it gates (the paper makes no identity-at-start claim).

    Args:
        channels: ``C``, the number of channels of the input.
        reduction: ``r``, the bottleneck's reduction ratio (16 in the paper).
        bias: whether ``fc1`` and ``fc2`` have biases (``True`` as in the original network).

    Shapes:
        * ``x``: ``[B, C, H, W]``
        * output ``y``: ``[B, C, H, W]``, ``y = x * s``
        * attention ``s`` (with ``return_attention=True``): ``[B, C, 1, 1]``, values in (0, 1)

    Parameters: ``2 C^2 / r`` weights, plus ``C + C/r`` biases when ``bias=True``.

    >>> se = SqueezeExcitation(64)
    >>> y, s = se(torch.randn(2, 64, 8, 8), return_attention=True)
    >>> y.shape, s.shape
    (torch.Size([2, 64, 8, 8]), torch.Size([2, 64, 1, 1]))
    """

    def __init__(self, channels: int, reduction: float = 16, bias: bool = True):
        super().__init__()
        self.hidden = reduced_channels(channels, reduction, type(self).__name__)
        self.channels = channels
        self.reduction = reduction
        self.fc1 = nn.Linear(channels, self.hidden, bias=bias)
        self.fc2 = nn.Linear(self.hidden, channels, bias=bias)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """``F_sq``: global average pooling, ``[B, C, H, W] -> [B, C]``."""
        return x.mean(dim=(2, 3))

    def excitation(self, z: torch.Tensor) -> torch.Tensor:
        """``F_ex``: the channel gates ``s = sigmoid(W2 relu(W1 z))``, ``[B, C] -> [B, C]``."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``[B, C, H, W] -> [B, C, H, W]``; with ``return_attention=True`` also the gate
        ``s``, ``[B, C, 1, 1]``, such that ``y == x * s``."""
        check_feature_map(x, self.channels, type(self).__name__)
        s = self.excitation(self.squeeze(x))[:, :, None, None]
        y = x * s
        return (y, s) if return_attention else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, hidden={self.hidden}"
