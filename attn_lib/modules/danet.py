"""Dual attention: position and channel attention side by side.

Fu, Liu, Tian, Li, Bao, Fang, Lu, "Dual Attention Network for Scene Segmentation", CVPR 2019
(DANet). Two self-attention modules look at the same feature map ``A: [B, C, H, W]``
(N = H*W positions):

* the **position attention module** (PAM) lets every position gather the features of all
  positions, weighted by how similar they are: an N x N softmax over positions;
* the **channel attention module** (CAM) lets every channel gather all channels, weighted by
  how similar their maps are: a C x C softmax over channels, with no learned projection.

Each one adds its result to the input through a learned scalar that starts at zero, so at
initialisation both are the identity and a pretrained backbone is not disturbed.

What lives here:

* :class:`PositionAttention` and :class:`ChannelAttention`: the two modules of the paper.
* :class:`DualAttention`: both on the same input, summed with the identity counted once; this is
  ``create_attention("danet", C)``. A backbone places it *between stages*
  (:mod:`attn_lib.models.resnet`, after stage 3 by default) because the position map has N^2
  entries: 64 x 64 = 4,096 entries per image on CIFAR's 8 x 8 stage-3 map, but 16.7 M at 64 x 64.
* :class:`DANetHead`: the paper's segmentation head, with its 3x3 convolutions around each module.

Where the paper and the official code (junfu1115/DANet) differ, the paper is the default and the
official behaviour is an option; each class says which.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_feature_map, check_positive, reduced_channels

__all__ = ["PositionAttention", "ChannelAttention", "DualAttention", "DANetHead", "fused_position_attention"]

#: How the position module computes ``softmax(Q K^T) V`` (see :class:`PositionAttention`).
IMPLEMENTATIONS = ("fused", "explicit")
#: Which channel-attention softmax (see :class:`ChannelAttention`).
CAM_VARIANTS = ("paper", "official")
#: Which modules :class:`DualAttention` runs.
MODES = ("both", "position", "channel")


def _check_choice(value: str, choices: tuple[str, ...], what: str, name: str) -> str:
    if value not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{name}: expected {what} to be one of {valid}, got {value!r}")
    return value


def _softmax_float32(energy: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, computed in at least float32.

    Under bf16 autocast the energies arrive in bf16; exponentiating and summing N of them in bf16
    loses the small weights and makes rows sum visibly away from 1, so the statistics are taken in
    float32 (float64 inputs stay float64)."""
    return torch.softmax(energy, dim=-1, dtype=torch.promote_types(energy.dtype, torch.float32))


#: Widest head :func:`fused_position_attention` forms by default: 128 is a head width every
#: fused attention kernel of PyTorch accepts and is tuned for (flash and memory-efficient on CUDA,
#: flash on the CPU).
FUSED_HEAD_WIDTH = 128


def fused_position_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             head_width: int | None = None) -> torch.Tensor:
    """``softmax(Q K^T) V`` for a query/key width ``d`` smaller than the value width ``C``, in one
    call of ``F.scaled_dot_product_attention`` that a fused kernel accepts (fused kernels need the
    query, key and value of each head to have the same width).

    Two exact rewrites make the widths equal:

    * **zero-padding** the query and key from ``d`` to the head width ``w``: the added zeros add
      nothing to any dot product, so the scores ``Q K^T`` do not change;
    * **heads that share one query and key**: the value ``[B, N, C]`` is cut into
      ``h = ceil(C / w)`` heads of ``w`` channels (zero-padded to ``h w`` channels when ``w`` does
      not divide ``C``; the padded outputs are zero and dropped) and the query and key are expanded
      to every head without copying. Each head computes the same ``S = softmax(Q K^T)`` and applies
      it to its own slice of the value channels; side by side, the heads give ``S V``.

    ``w = max(d, min(C, FUSED_HEAD_WIDTH))`` by default: one head of width ``C`` where ``C <= 128``
    (the padded form), several of width 128 beyond. Each head computes its own softmax, so fewer,
    wider heads mean fewer exponentials (``h N^2``); the multiply-adds are about ``2 N^2 C``
    whatever ``w`` is (the explicit form: ``N^2 (d + C)``), the price of never storing ``S``.

    Shapes: ``query, key: [B, N, d]``, ``value: [B, N, C]`` -> ``[B, N, C]``.
    """
    batch, positions, width = query.shape
    channels = value.shape[-1]
    if head_width is None:
        head_width = max(width, min(channels, FUSED_HEAD_WIDTH))
    if head_width < width:
        raise ValueError(f"fused_position_attention: expected head_width >= the query width {width}, "
                         f"got {head_width}")
    heads = -(-channels // head_width)
    query = F.pad(query, (0, head_width - width))
    key = F.pad(key, (0, head_width - width))
    value = F.pad(value, (0, heads * head_width - channels))
    value = value.view(batch, positions, heads, head_width).transpose(1, 2)  # [B, h, N, w]
    shared = (batch, heads, positions, head_width)
    context = F.scaled_dot_product_attention(query[:, None].expand(shared), key[:, None].expand(shared),
                                             value, scale=1.0)
    return context.transpose(1, 2).reshape(batch, positions, heads * head_width)[..., :channels]


class PositionAttention(nn.Module):
    r"""Position attention module (PAM) of DANet (Fu et al., CVPR 2019), Eq. (1)-(2).

    With the input ``A: [B, C, H, W]`` seen as C x N (N = H*W), three 1x1 convolutions give
    ``Q = W_q A``, ``K = W_k A`` (``C/r`` channels each, r = 8) and ``V = W_v A`` (C channels). Then

    .. math::
        S_{ij} = \frac{\exp(Q_i \cdot K_j)}{\sum_{j'} \exp(Q_i \cdot K_{j'})}, \qquad
        E_i = \alpha \sum_j S_{ij} V_j + A_i,

    i.e. row i of ``S: [B, N, N]`` is a softmax over the positions j that position i attends to,
    and ``E = alpha * V S^T + A`` in the paper's C x N layout. ``alpha`` is a scalar initialised to 0,
    so the module starts as the identity and learns how much context to add. There is no
    ``1/sqrt(d)`` scaling in DANet (nor in SAGAN, where the module comes from).

    Names. The paper writes ``s_ji = exp(B_i . C_j) / sum_i exp(B_i . C_j)``: the position j being
    updated is seen through convolution C (our ``query``) and the positions i it reads from through
    convolution B (our ``key``); D is ``value``. The official code names its convolutions by role
    too (``query_conv``, ``key_conv``, ``value_conv``, with a softmax over the key positions), which
    matches this reading. The text's "softmax of B^T C" is often read the other way round (B as the
    query, from the order of the product); the two are 1x1 convolutions of the same shape, so both
    readings define the same family of functions. Naming by role removes the ambiguity.

    Implementations (identical results; tests check it):

    * ``"explicit"`` builds ``S`` as the chapter derives it: O(N^2) memory. Its softmax runs in
      float32 even under bf16 autocast.
    * ``"fused"`` (default) computes the same ``S V`` with one call of
      ``F.scaled_dot_product_attention`` (``scale=1.0`` because DANet does not divide by
      ``sqrt(d)``), so a fused kernel can run and the N x N matrix is never stored. Fused kernels
      need the query, key and value widths to be equal, and here they are not (C/r against C:
      called directly, PyTorch silently falls back to its math path, which builds ``S``). So
      :func:`fused_position_attention` zero-pads the query and key to the value's width (zeros
      add nothing to a dot product), or, beyond 128 channels, to heads of 128 value channels that
      share the one query and key: exactly ``S V``, with no N x N matrix stored.

    ``S`` is built only when ``return_attention=True`` (then the explicit path runs, whatever
    ``implementation`` says, so the map returned is the one applied).

    Parameters: ``2 (C * C/r + C/r) + (C^2 + C) + 1``; for C = 256, r = 8:
    ``2 * 8,224 + 65,792 + 1 = 82,241``. The 1x1 convolutions have biases, as in the official code.

    Args:
        channels: C, channels of the input (and output).
        reduction: r, the query/key width is ``C // r`` (8 in the paper).
        implementation: ``"fused"`` or ``"explicit"``.

    Shapes: ``x: [B, C, H, W] -> y: [B, C, H, W]``; with ``return_attention=True`` also
    ``S: [B, N, N]`` (float32 under autocast), each row summing to 1.
    """

    def __init__(self, channels: int, reduction: float = 8, implementation: str = "fused"):
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive(channels, "channels", name)
        self.reduction = reduction
        self.hidden = reduced_channels(channels, reduction, name)
        self.implementation = _check_choice(implementation, IMPLEMENTATIONS, "implementation", name)
        self.query = nn.Conv2d(channels, self.hidden, kernel_size=1)
        self.key = nn.Conv2d(channels, self.hidden, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.alpha = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor,
               return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context ``V S^T`` as ``[B, C, H, W]`` (before ``alpha`` and the residual), and ``S``
        ``[B, N, N]`` when asked (else ``None``). Does not validate ``x``: call :meth:`forward`."""
        batch, channels, height, width = x.shape
        # Positions as a sequence, [B, N, channels], the layout attention kernels expect.
        query = self.query(x).flatten(2).transpose(1, 2).contiguous()
        key = self.key(x).flatten(2).transpose(1, 2).contiguous()
        value = self.value(x).flatten(2).transpose(1, 2).contiguous()
        attention = None
        if return_attention or self.implementation == "explicit":
            attention = _softmax_float32(query @ key.transpose(1, 2))
            context = attention.to(value.dtype) @ value  # S V = (V^T S^T)^T, the paper's D S^T
        else:
            context = fused_position_attention(query, key, value)
        return context.transpose(1, 2).reshape(batch, channels, height, width), attention

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: [B, C, H, W] -> x + alpha * V S^T``; with ``return_attention`` also ``S: [B, N, N]``."""
        check_feature_map(x, self.channels, type(self).__name__)
        context, attention = self.attend(x, return_attention)
        y = x + self.alpha * context
        return (y, attention) if return_attention else y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, reduction={self.reduction}, hidden={self.hidden}, "
                f"implementation={self.implementation!r}")


class ChannelAttention(nn.Module):
    r"""Channel attention module (CAM) of DANet (Fu et al., CVPR 2019), Eq. (3)-(4).

    With the input ``A: [B, C, H, W]`` seen as C x N, no projection is learned:

    .. math::
        X_{ij} = \frac{\exp(A_i \cdot A_j)}{\sum_{j'} \exp(A_i \cdot A_{j'})}, \qquad
        E_i = \beta \sum_j X_{ij} A_j + A_i,

    i.e. ``X = softmax(A A^T): [B, C, C]`` (row i: how much channel i reads from each channel j,
    summing to 1) and ``E = beta * X A + A``. ``beta`` is a scalar initialised to 0 (identity at start).
    The only parameter is ``beta``.

    ``cam`` chooses the softmax:

    * ``"paper"`` (default): ``softmax(A A^T)``, Eq. (3): similar channels attend to each other.
    * ``"official"``: the official code (and most ports, including a widely reposted Zhihu post's) computes
      ``softmax(max_j(energy) - energy)``. Softmax ignores a constant added to a row, so this *is*
      ``softmax(-energy)``: each channel attends most to the channels *least* similar to it. It is
      not a numerical-stability trick (that would be ``energy - max``, which ``torch.softmax``
      already does internally). Offered so the difference can be shown, and to load official weights.

    The Gram matrix ``A A^T`` sums N products, so its entries grow with N; bf16 keeps 8 bits of
    mantissa, so under autocast its rounding error (hundreds of units for large maps) would reach
    the logits the softmax compares. It is therefore formed in float32 (C^2 N multiply-adds, small
    next to the convolutions around it).

    Shapes: ``x: [B, C, H, W] -> y: [B, C, H, W]``; with ``return_attention=True`` also
    ``X: [B, C, C]``, each row summing to 1.
    """

    def __init__(self, channels: int, cam: str = "paper"):
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive(channels, "channels", name)
        self.cam = _check_choice(cam, CAM_VARIANTS, "cam", name)
        self.beta = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor,
               return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context ``X A`` as ``[B, C, H, W]`` (before ``beta`` and the residual), and ``X``
        ``[B, C, C]`` when asked (else ``None``). Does not validate ``x``: call :meth:`forward`."""
        features = x.flatten(2)  # A: [B, C, N]
        with torch.autocast(device_type=x.device.type, enabled=False):
            gram = features.to(torch.promote_types(features.dtype, torch.float32))
            energy = gram @ gram.transpose(1, 2)
        if self.cam == "official":
            energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = _softmax_float32(energy)
        context = attention.to(features.dtype) @ features
        return context.reshape(x.shape), (attention if return_attention else None)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: [B, C, H, W] -> x + beta * X A``; with ``return_attention`` also ``X: [B, C, C]``."""
        check_feature_map(x, self.channels, type(self).__name__)
        context, attention = self.attend(x, return_attention)
        y = x + self.beta * context
        return (y, attention) if return_attention else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, cam={self.cam!r}"


class DualAttention(nn.Module):
    r"""Position and channel attention on the same input (DANet, Fu et al., CVPR 2019).

    .. math::
        y = x + \alpha \, V S^T + \beta \, X x

    with the position term of :class:`PositionAttention` and the channel term of
    :class:`ChannelAttention`, both computed from the same ``x``. The paper sums the two modules'
    outputs, each of which already contains ``x``; here the identity is counted once, so that with
    ``alpha = beta = 0`` (the initialisation) the module is exactly the identity and can be dropped
    into a pretrained network. This is ``create_attention("danet", C)``.

    Placement: between two stages of a backbone (``"stage"`` in :mod:`attn_lib.registry`), at a
    resolution where the N x N position map is affordable; in the CIFAR ResNet-18 it goes after
    stage 3 (256 channels, 8 x 8). The paper's own head, with its 3x3 convolutions, is
    :class:`DANetHead`.

    Parameters (``mode="both"``, C = 256, r = 8): 82,241 for the position module (see
    :class:`PositionAttention`) plus 1 (``beta``) = **82,242**, the "+82 k after layer3".

    Args:
        channels: C.
        mode: ``"both"`` (default), ``"position"`` or ``"channel"`` for one module alone.
        reduction: r of the position module's query/key (``C // r``; 8 in the paper). Unused when
            ``mode="channel"``.
        cam: ``"paper"`` or ``"official"`` (see :class:`ChannelAttention`).
        implementation: ``"fused"`` or ``"explicit"`` (see :class:`PositionAttention`).

    Shapes: ``x: [B, C, H, W] -> y: [B, C, H, W]``. With ``return_attention=True`` returns
    ``(y, {"position": [B, N, N], "channel": [B, C, C]})`` with only the active modules' keys.
    """

    def __init__(self, channels: int, mode: str = "both", reduction: float = 8, cam: str = "paper",
                 implementation: str = "fused"):
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive(channels, "channels", name)
        self.mode = _check_choice(mode, MODES, "mode", name)
        self.position = (PositionAttention(channels, reduction, implementation)
                         if mode in ("both", "position") else None)
        self.channel = ChannelAttention(channels, cam) if mode in ("both", "channel") else None

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: [B, C, H, W] -> y: [B, C, H, W]``; see the class docstring for ``return_attention``."""
        check_feature_map(x, self.channels, type(self).__name__)
        y = x
        attention: dict[str, torch.Tensor] = {}
        if self.position is not None:
            context, attention["position"] = self.position.attend(x, return_attention)
            y = y + self.position.alpha * context
        if self.channel is not None:
            context, attention["channel"] = self.channel.attend(x, return_attention)
            y = y + self.channel.beta * context
        return (y, attention) if return_attention else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}"


def _conv3x3_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # No bias: the batch norm that follows has its own.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DANetHead(nn.Module):
    r"""The segmentation head of DANet (Fu et al., CVPR 2019, Sec. 3.4 and Fig. 2).

    On the backbone's last feature map ``x: [B, C_in, H, W]`` (a dilated ResNet's 2048 channels at
    1/8 resolution in the paper), two parallel branches::

        position branch: 3x3 conv -> C_in/4, BN, ReLU -> PositionAttention -> 3x3 conv, BN, ReLU
        channel branch:  3x3 conv -> C_in/4, BN, ReLU -> ChannelAttention  -> 3x3 conv, BN, ReLU
        logits = conv1x1(dropout(position + channel))   # [B, num_classes, H, W]

    The layout follows the official ``DANetHead`` (junfu1115/DANet), which agrees with the paper:
    each module gets its own dimension-reducing 3x3 convolution (bias-free, followed by BN and
    ReLU), its own 3x3 convolution after, and the two are fused by summation. Choices where the
    paper is silent and the official code decides:

    * dropout is ``nn.Dropout2d`` (whole channels) with p = 0.1, before the 1x1 classifier;
    * the official head also classifies each branch alone (two more dropout + 1x1 convolutions)
      for auxiliary losses during training. They are off by default (the paper's text describes one
      prediction); ``aux=True`` builds them and ``forward`` then returns
      ``(logits, position_logits, channel_logits)``, the official order.

    Upsampling the logits to the image size is the caller's job (the official model does it
    outside the head, bilinearly).

    Args:
        in_channels: C_in.
        num_classes: K, channels of the logits.
        reduction: the branches work at ``C_in // reduction`` channels (4 in the paper).
        dropout: probability of the ``Dropout2d`` before each classifier (0.1).
        cam: ``"paper"`` or ``"official"``, see :class:`ChannelAttention`.
        position_reduction: r of the position module (8), on the reduced width.
        implementation: ``"fused"`` or ``"explicit"``, see :class:`PositionAttention`.
        aux: also return per-branch logits (official training).

    Shapes: ``x: [B, C_in, H, W] -> logits: [B, K, H, W]`` (a 3-tuple of those if ``aux``). With
    ``return_attention=True``: ``(output, {"position": [B, N, N], "channel": [B, C_in/4, C_in/4]})``.
    """

    def __init__(self, in_channels: int, num_classes: int, reduction: float = 4, dropout: float = 0.1,
                 cam: str = "paper", position_reduction: float = 8, implementation: str = "fused",
                 aux: bool = False):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_positive(in_channels, "in_channels", name)
        self.num_classes = check_positive(num_classes, "num_classes", name)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{name}: expected dropout to be a probability in [0, 1), got {dropout!r}")
        self.aux = bool(aux)
        width = reduced_channels(in_channels, reduction, name)
        self.width = width

        self.position_in = _conv3x3_bn_relu(in_channels, width)
        self.position = PositionAttention(width, position_reduction, implementation)
        self.position_out = _conv3x3_bn_relu(width, width)
        self.channel_in = _conv3x3_bn_relu(in_channels, width)
        self.channel = ChannelAttention(width, cam)
        self.channel_out = _conv3x3_bn_relu(width, width)
        self.classifier = self._classifier(width, num_classes, dropout)
        if self.aux:
            self.position_classifier = self._classifier(width, num_classes, dropout)
            self.channel_classifier = self._classifier(width, num_classes, dropout)

    @staticmethod
    def _classifier(width: int, num_classes: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(width, num_classes, kernel_size=1))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: [B, C_in, H, W] -> logits [B, K, H, W]``; see the class docstring for the rest."""
        check_feature_map(x, self.in_channels, type(self).__name__)
        attention: dict[str, torch.Tensor] = {}
        if return_attention:
            position, attention["position"] = self.position(self.position_in(x), return_attention=True)
            channel, attention["channel"] = self.channel(self.channel_in(x), return_attention=True)
        else:
            position = self.position(self.position_in(x))
            channel = self.channel(self.channel_in(x))
        position = self.position_out(position)
        channel = self.channel_out(channel)
        logits = self.classifier(position + channel)
        if self.aux:
            output = (logits, self.position_classifier(position), self.channel_classifier(channel))
        else:
            output = logits
        return (output, attention) if return_attention else output

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, width={self.width}, "
                f"aux={self.aux}")
