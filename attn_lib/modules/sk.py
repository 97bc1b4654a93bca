"""Selective Kernel convolution: a convolution that chooses its receptive field per channel.

Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019 (arXiv:1903.06586).

A neuron in the visual cortex changes the size of its receptive field with the stimulus; a neuron
of a CNN layer does not. The SK unit gives it that choice: it runs the same input through ``M``
convolutions with different receptive fields (the *split*), summarises all of them in one small
vector (the *fuse*), and lets that vector decide, channel by channel, how much of each branch to
keep (the *select*, a softmax across the branches). In SKNet the SK unit *replaces* the 3x3
convolution of every block; it is a convolution with a data-dependent kernel size, not a gate
appended after one.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._checks import check_feature_map, check_positive

__all__ = ["SelectiveKernel"]

#: Standard deviation of the Gaussian that initialises the two fully connected layers of the fuse
#: and select steps in the authors' released SKNet-50 (``weight_filler: gaussian, std: 0.01``).
#: It makes the selection logits tiny, so every branch starts with weight close to ``1 / M``.
OFFICIAL_FC_INIT_STD = 0.01


class SelectiveKernel(nn.Module):
    r"""The SK convolution: ``M`` dilated 3x3 branches mixed by a softmax across the branches.

    With input ``X: [B, C_in, H, W]``, ``C = out_channels``, :math:`\delta` = ReLU and
    :math:`\mathcal{B}` = batch norm (Li et al., CVPR 2019, Eq. 1-6):

    .. math::

        \text{Split:}\quad U_m &= \delta(\mathcal{B}(\mathrm{conv}^{3\times3}_{\text{dilation } m}(X))),
            \qquad m = 1, \dots, M \\
        \text{Fuse:}\quad U &= \textstyle\sum_m U_m, \qquad
            s_c = \frac{1}{H'W'} \sum_{i,j} U_c(i, j), \qquad
            z = \delta(\mathcal{B}(W s)), \quad W \in \mathbb{R}^{d \times C},\
            d = \max(C / r, L) \\
        \text{Select:}\quad a_{m,c} &= \frac{\exp(A_{m,c}\, z)}{\sum_{k=1}^{M} \exp(A_{k,c}\, z)},
            \qquad V_c = \textstyle\sum_m a_{m,c}\, U_{m,c}

    Split. Branch ``m`` is a 3x3 convolution with dilation ``m`` (and padding ``m``, so every
    branch has the same output size), which sees a ``(2m+1) x (2m+1)`` window: the paper's
    5x5 branch is "a 3x3 with dilation 2", at the parameter cost of a 3x3. Each convolution is
    grouped (``groups``, G = 32 in SKNet, where the unit sits in a ResNeXt block), has no bias
    (a batch norm follows) and is followed by BN and ReLU. ``stride`` applies to every branch.

    Fuse. ``W`` (``fuse.fc``, a 1x1 convolution ``C -> d`` without bias) reduces the pooled
    vector to ``d = max(C // r, L)`` values; the floor ``L`` (``min_dim``) keeps ``z`` from
    becoming too small for narrow layers, so unlike SE no reduction can leave zero hidden units.

    Select. The ``M`` matrices ``A_m`` (``select``) are stored as one 1x1 convolution
    ``d -> M * C``, read as ``[B, M, C]`` (branch-major, as in the authors' network definition).
    The softmax runs over the **branch axis** (dim 1), separately for every channel: for each
    channel the branch weights sum to 1. A softmax over the channels would instead make the
    weights of one branch sum to 1 across channels, which is a different (and wrong) model.

    Where this sits in a network: in place of a block's 3x3 convolution. In SKNet-50 that is the
    grouped 3x3 of a ResNeXt bottleneck (``groups=32``, ``M=2``, ``r=16``, ``L=32``). The CIFAR
    ResNets of :mod:`attn_lib.models.resnet` have dense convolutions, so the backbone builds it
    with ``groups=1``, ``out_channels = channels`` and stride 1, in place of each BasicBlock's
    second 3x3 convolution (the block's own BN still follows it). There ``M = 2`` dense branches
    double that convolution's cost: a CIFAR ResNet-18 grows by 6,459,392 parameters.

    Choices where the paper leaves something open:

    * Biases: none in the branch convolutions or in ``W`` (each is followed by a BN, whose
      mean subtraction cancels a bias), and none in ``A``. A bias on ``A`` would *not* be
      cancelled: it has one value per branch and channel, ``b_{m,c}``, and a softmax over the
      branches is unchanged only by a shift that is the same for every branch. A bias that
      differs between branches is a learned, input-independent preference for one branch
      (:math:`a_{m,c} \propto e^{b_{m,c}} e^{A_{m,c} z}`), so it changes the unit. Having none
      follows the paper's equations and the authors' Caffe SKNet-50, which has none.
    * Initialisation: ``W`` and ``A`` are drawn from N(0, 0.01^2) as in the authors' SKNet-50
      (:data:`OFFICIAL_FC_INIT_STD`), so the selection starts almost uniform (``a ≈ 1/M``). The
      branch convolutions keep PyTorch's default, like the rest of the backbone.
    * Precision: the softmax statistics are computed in float32 (or float64 for float64 input)
      even under autocast; the weights are then cast to the branches' dtype for the sum.
    * The fuse BN normalises ``z`` over the batch, so training needs a batch of at least 2 (a
      batch of 1 raises ``ValueError``); evaluation works for any batch size.
    * timm's ``SelectiveKernel`` differs by default: it splits the *input* channels between the
      branches (``split_input=True``, each branch sees ``C_in / M`` channels), uses
      ``d = make_divisible(C / 16, 8)`` without the floor ``L``, and silently clamps ``groups``.
      With ``split_input=False``, ``rd_channels=d`` and the same groups it computes exactly this
      module (the tests check it).

    Cost, and the full-width alternative. Dilated 3x3 branches keep the unit cheap. A variant
    that circulates as "SK attention" uses four *dense* branches of kernel 1, 3, 5 and 7 (with
    biases) on the full width; at 512 channels (r = 16, L = 32) it has 22,110,240 parameters,
    about twice a whole CIFAR ResNet-18 (11.2 M), and costs 22.0 M multiply-adds per output
    pixel in its convolutions. ``SelectiveKernel(512)`` (M = 2, G = 32) has 198,720 parameters, 111 times
    fewer, and 147 k multiply-adds per output pixel; even dense (``groups=1``) it has 4,769,856.

    Args:
        channels: ``C_in``, channels of the input.
        out_channels: ``C``, channels of the output (default: ``channels``); the attention and
            ``d`` are computed at this width.
        stride: stride of every branch convolution (2 to halve ``H`` and ``W``).
        branches: ``M``, the number of branches (2 in SKNet); branch ``m`` has dilation ``m``.
            With ``M = 1`` the unit is a plain conv-BN-ReLU and every weight is 1.
        groups: ``G``, groups of every branch convolution (32 in SKNet); must divide both
            ``channels`` and ``out_channels``.
        reduction: ``r``, the reduction ratio for ``d = max(C // r, L)`` (16 in the paper).
        min_dim: ``L``, the smallest allowed ``d`` (32 in the paper).

    Shapes:
        * ``x``: ``[B, C_in, H, W]``;
        * output ``V``: ``[B, C, H', W']`` with ``H' = floor((H - 1) / stride) + 1`` (and ``W'``);
        * ``U_m``: ``[B, C, H', W']``; ``s``: ``[B, C, 1, 1]``; ``z``: ``[B, d, 1, 1]``;
        * attention ``a``: ``[B, M, C, 1, 1]``, summing to 1 over dim 1.

    Example:
        >>> sk = SelectiveKernel(64)
        >>> y, a = sk(torch.randn(2, 64, 8, 8), return_attention=True)
        >>> y.shape, a.shape
        (torch.Size([2, 64, 8, 8]), torch.Size([2, 2, 64, 1, 1]))
    """

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1,
                 branches: int = 2, groups: int = 32, reduction: float = 16,
                 min_dim: int = 32) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive(channels, "channels", name)
        out_channels = channels if out_channels is None else out_channels
        check_positive(out_channels, "out_channels", name)
        check_positive(stride, "stride", name)
        check_positive(branches, "branches (the number of kernels M)", name)
        check_positive(groups, "groups", name)
        check_positive(min_dim, "min_dim (L)", name)
        for what, width in (("channels", channels), ("out_channels", out_channels)):
            if width % groups:
                raise ValueError(
                    f"{name}: expected {what} divisible by groups={groups}, got {what}={width} "
                    f"({width} % {groups} = {width % groups}); pass groups that divide both widths, "
                    f"e.g. groups=1 for a dense convolution"
                )
        # Not reduced_channels(): the floor L makes d >= 1 even where C // r == 0, so a narrow
        # layer is valid here; only the ratio itself needs checking.
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or reduction <= 0:
            raise ValueError(f"{name}: expected a positive reduction ratio, got {reduction!r}")

        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.branches = branches
        self.groups = groups
        self.reduction = reduction
        self.min_dim = min_dim
        self.hidden = max(int(out_channels // reduction), min_dim)  # d

        self.split = nn.ModuleList(
            nn.Sequential(OrderedDict(
                conv=nn.Conv2d(channels, out_channels, kernel_size=3, stride=stride,
                               padding=dilation, dilation=dilation, groups=groups, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(inplace=True),
            ))
            for dilation in range(1, branches + 1)
        )
        self.fuse = nn.Sequential(OrderedDict(
            fc=nn.Conv2d(out_channels, self.hidden, kernel_size=1, bias=False),  # W
            bn=nn.BatchNorm2d(self.hidden),
            relu=nn.ReLU(inplace=True),
        ))
        self.select = nn.Conv2d(self.hidden, branches * out_channels, kernel_size=1, bias=False)  # A_1..A_M
        nn.init.normal_(self.fuse.fc.weight, std=OFFICIAL_FC_INIT_STD)
        nn.init.normal_(self.select.weight, std=OFFICIAL_FC_INIT_STD)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, C_in, H, W] -> V: [B, C, H', W']``; with ``return_attention=True`` also the
        branch weights ``[B, M, C, 1, 1]`` that were applied."""
        name = type(self).__name__
        check_feature_map(x, self.channels, name)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                f"{name}: expected a batch of at least 2 in training mode (the fuse step's batch "
                f"norm normalises z over the batch), got batch size {x.shape[0]}; use .eval() "
                f"for a single image"
            )

        features = [branch(x) for branch in self.split]  # split: M x [B, C, H', W']
        fused = features[0]
        for feature in features[1:]:
            fused = fused + feature  # U
        z = self.fuse(fused.mean(dim=(2, 3), keepdim=True))  # s: [B, C, 1, 1] -> z: [B, d, 1, 1]
        logits = self.select(z).unflatten(1, (self.branches, self.out_channels))  # [B, M, C, 1, 1]

        # Softmax statistics in at least float32: under bf16 autocast the logits arrive in bf16.
        stats_dtype = torch.promote_types(logits.dtype, torch.float32)
        attention = torch.softmax(logits.to(stats_dtype), dim=1).to(fused.dtype)

        output = attention[:, 0] * features[0]
        for m in range(1, self.branches):
            output = output + attention[:, m] * features[m]  # V = sum_m a_m * U_m
        if return_attention:
            return output, attention
        return output

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, out_channels={self.out_channels}, stride={self.stride}, "
                f"branches={self.branches}, groups={self.groups}, reduction={self.reduction}, "
                f"hidden={self.hidden}")
