"""The non-local block: every position attends to every other position of the feature map.

Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018 (arXiv:1711.07971).

A convolution sees a small neighbourhood; long-range dependencies are only reached by stacking
many of them. A non-local operation computes the response at a position as a weighted sum of the
features at *all* positions (in space for images, in space-time for video), with weights given by
a pairwise function of the two positions' features. The paper shows that its "embedded gaussian"
form is the self-attention of the Transformer, written for convolutional feature maps.

Where it sits: the paper inserts a few blocks into the middle stages of a ResNet (res3 and res4);
a block after res5 (7x7) helped less, because the map is too small to have long-range structure,
while at high resolution the N x N map costs too much (O(N^2) memory and time). In
:mod:`attn_lib.models.resnet` one block sits after stage 3 (8x8 = 64 positions for CIFAR images).
Because ``W_z`` starts at zero, the block starts as the identity and can be inserted into a
pre-trained network without changing what it computes.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn
import torch.nn.functional as F

from ._checks import check_feature_map, check_positive, reduced_channels

__all__ = ["NonLocalBlock"]

MODES = ("gaussian", "embedded", "dot", "concat")
IMPLEMENTATIONS = ("auto", "explicit", "fused")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
# Sub-sampling halves the spatial axes only; for video the time axis is kept (1x2x2).
_POOL_KERNEL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_AXIS_NAMES = {1: ("T",), 2: ("H", "W"), 3: ("T", "H", "W")}


class NonLocalBlock(nn.Module):
    r"""The non-local block for sequences (``dim=1``), images (``dim=2``) and videos (``dim=3``).

    For a feature map with positions :math:`i = 1..N` (Eqs. 1 and 6 of the paper):

    .. math::

        y_i &= \frac{1}{\mathcal{C}(x)} \sum_{j} f(x_i, \hat{x}_j)\, g(\hat{x}_j),
            \qquad g(x) = W_g x\\
        z_i &= W_z\, y_i + x_i

    where :math:`\hat{x}` is :math:`x` itself, or a max-pooled copy with :math:`N' < N` positions
    when ``sub_sample=True``. The four pairwise functions (Sec. 3.2), with :math:`\theta(x) =
    W_\theta x` and :math:`\phi(x) = W_\phi x` 1x1 convolutions to ``inter_channels`` ``d``:

    ============ ======================================================= ======================
    ``mode``     :math:`f(x_i, x_j)`                                     :math:`\mathcal{C}(x)`
    ============ ======================================================= ======================
    gaussian     :math:`e^{x_i^\top x_j}` (raw input: no θ, φ)           :math:`\sum_j f`
    embedded     :math:`e^{\theta(x_i)^\top \phi(x_j)}`                  :math:`\sum_j f`
    dot          :math:`\theta(x_i)^\top \phi(x_j)`                      :math:`N'`
    concat       :math:`\mathrm{ReLU}(w_f^\top [\theta(x_i); \phi(x_j)])` :math:`N'`
    ============ ======================================================= ======================

    With :math:`\mathcal{C}(x) = \sum_j f` the weights :math:`f / \mathcal{C}` are a softmax over
    the keys :math:`j` (each row of the N x N' map sums to 1). :math:`W_z` is a 1x1 convolution
    back to ``channels``, followed by batch norm when ``bn_layer=True``.

    Implementations (all compute the same function; see ``implementation``):

    * ``"explicit"`` builds the N x N' map of weights and multiplies it with ``g`` (what the
      chapter derives; O(N N') memory).
    * ``"fused"``: the gaussian and embedded forms are exactly
      ``F.scaled_dot_product_attention(θ, φ, g, scale=1.0)`` (fused kernels never store the map);
      the dot form is re-associated, :math:`\theta\,(\phi^\top g) / N'`, which is linear in N.
      Note ``scale=1.0``: the function's default, :math:`1/\sqrt{d}`, is *not* the paper's.
    * ``"auto"`` (default): fused where a fused form exists; concat is always explicit (its ReLU
      sits between the pairwise term and the sum, so nothing re-associates).

    The N x N' map is built only when it is asked for (``return_attention=True``, which runs the
    explicit path) or by the explicit implementation; a block that returned it on every call
    would pay O(N N') memory even in the fused case.

    Choices where the paper and the official code differ, or where the paper leaves it open:

    * ``scale``: the official Caffe2 code (facebookresearch/video-nonlocal-net,
      ``lib/models/nonlocal_helper.py``, ``USE_SCALE``) multiplies :math:`\theta^\top\phi`
      by :math:`1/\sqrt{d}` *inside its softmax branch only* (``USE_SOFTMAX``, the embedded
      gaussian); its dot-product branch divides by :math:`N'` and is never scaled. The
      paper's equations scale nothing. Default ``False`` (the paper). ``scale=True`` is:

      - ``embedded``: the official code's option, factor :math:`1/\sqrt{d}`
        (``inter_channels``);
      - ``gaussian``: this library's extension (the official code has no un-embedded
        softmax form): the same temperature inside the softmax, :math:`1/\sqrt{C}`, the
        length of the raw vectors that are dotted;
      - ``dot`` and ``concat``: refused (``ValueError``). In the dot form a constant factor
        only multiplies ``y``, which the learned :math:`W_z` (and its batch norm) absorbs: it
        changes nothing the block can represent, and it is not what the official code does.
        Concat has no :math:`\theta^\top\phi` product at all.

      timm's ``NonLocalAttn`` (embedded only) scales by :math:`1/\sqrt{\text{channels}}`.
    * Sub-sampling order: the paper's text adds "a max pooling layer after φ and g", and so does
      this module by default (``pool_input=False``: ``φ = pool(W_φ x)``, ``g = pool(W_g x)``).
      The official code pools ``x`` first and applies the 1x1 convolutions to the pooled map,
      which is the :math:`\hat{x}` of the paper's sub-sampled equation and 4x cheaper in those two
      convolutions; ``pool_input=True`` does that. Max-pooling does not commute with a linear
      map, so the two give different (equally trainable) blocks. For gaussian, φ is the
      identity and the two orders agree for φ.
    * Biases: θ, φ, g and W_z have biases, as in the official code (``NO_BIAS = False``); W_z's
      bias is redundant when batch norm follows, but kept so that weights port both ways.
    * W_z is stored as a 1x1 convolution (weights port to and from other implementations) but
      applied as the matrix it is (see ``forward`` for why).
    * Initialisation: with ``bn_layer=True`` the batch norm's γ and β start at 0 (the paper
      initialises γ to 0); without it, W_z's weight and bias start at 0. Either way the block
      starts as the identity, ``z = x``. θ, φ, g, w_f keep PyTorch's default initialisation
      (the official code draws them from N(0, 0.01²)).
    * Concat: :math:`w_f` (a 1x1 convolution from ``2d`` channels to 1 in the paper) is stored
      as ``nn.Linear(2d, 1, bias=False)``, a weight vector as in the paper. It is applied
      without building the ``[B, 2d, N, N']`` tensor of all pairs: :math:`w_f^\top[\theta_i;
      \phi_j] = w_\theta^\top \theta_i + w_\phi^\top \phi_j`, a broadcast sum of an N- and an
      N'-vector, then ReLU. This is an identity, not an approximation.

    Args:
        channels: ``C``, the number of channels of the input.
        mode: the pairwise function ``f``: ``"gaussian"``, ``"embedded"`` (the paper's default,
            embedded gaussian), ``"dot"`` or ``"concat"``.
        dim: 1 for ``[B, C, T]``, 2 for ``[B, C, H, W]``, 3 for ``[B, C, T, H, W]``.
        sub_sample: max-pool the keys and values, φ and g (kernel 2 for 1D, 2x2 for 2D, 1x2x2
            for 3D; odd sizes are floored), so that N' is about N/2, N/4, N/4.
        bn_layer: batch norm after W_z (the paper's default for its ResNet experiments).
        inter_channels: ``d``, the width of θ, φ and g; ``channels // 2`` by default.
        scale: multiply θᵀφ by 1/sqrt(length of the dotted vectors) before the softmax
            (official code for embedded, this library's extension for gaussian; refused for
            dot and concat, see above).
        implementation: ``"auto"``, ``"explicit"`` or ``"fused"`` (see above).
        pool_input: with ``sub_sample``, pool ``x`` before the φ and g convolutions (official
            code) instead of pooling their outputs (paper's text, default).

    Shapes (``S`` the spatial axes, ``N = prod(S)``, ``N'`` after sub-sampling):
        * ``x``: ``[B, C, *S]``: ``[B, C, T]``, ``[B, C, H, W]`` or ``[B, C, T, H, W]``
        * θ: ``[B, N, d]`` (``[B, N, C]`` for gaussian); φ: ``[B, N', d]`` (``[B, N', C]``);
          g: ``[B, N', d]``; y: ``[B, N, d]``; W_z y: ``[B, C, N]``, viewed as ``[B, C, *S]``
        * output ``z``: ``[B, C, *S]``
        * attention (with ``return_attention=True``): ``[B, N, N']``, the weights
          :math:`f(x_i, \hat{x}_j) / \mathcal{C}(x)` that were applied, ``y = attention @ g``;
          rows sum to 1 for gaussian and embedded, for dot and concat it is :math:`f / N'`.

    Parameters (embedded, dot): ``3 (C d + d) + (d C + C)`` plus ``2 C`` with ``bn_layer``;
    gaussian has only g (no θ, φ); concat adds ``2 d`` for w_f. For ``C = 256`` (embedded, 2D,
    bn_layer) that is 132,224.

    >>> block = NonLocalBlock(64)
    >>> z, attention = block(torch.randn(2, 64, 8, 8), return_attention=True)
    >>> z.shape, attention.shape
    (torch.Size([2, 64, 8, 8]), torch.Size([2, 64, 16]))
    """

    def __init__(
        self,
        channels: int,
        mode: str = "embedded",
        dim: int = 2,
        sub_sample: bool = True,
        bn_layer: bool = True,
        inter_channels: Optional[int] = None,
        scale: bool = False,
        implementation: str = "auto",
        pool_input: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        check_positive(channels, "channels", name)
        if mode not in MODES:
            raise ValueError(f"{name}: expected mode in {', '.join(MODES)}, got {mode!r}")
        if isinstance(dim, bool) or dim not in _CONV:
            raise ValueError(f"{name}: expected dim 1, 2 or 3, got {dim!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{name}: expected implementation in {', '.join(IMPLEMENTATIONS)}, "
                f"got {implementation!r}"
            )
        if mode == "concat" and implementation == "fused":
            raise ValueError(
                f"{name}: expected implementation 'auto' or 'explicit' for mode 'concat' "
                f"(it has no fused form), got 'fused'"
            )
        if mode == "concat" and scale:
            raise ValueError(
                f"{name}: expected scale=False for mode 'concat' (it has no θᵀφ product to "
                f"scale), got True"
            )
        if mode == "dot" and scale:
            raise ValueError(
                f"{name}: expected scale=False for mode 'dot': the official code scales θᵀφ "
                f"only before its softmax (embedded gaussian), and in the dot form a constant "
                f"factor only rescales y, which W_z absorbs; got True"
            )
        if inter_channels is None:
            inter_channels = reduced_channels(channels, 2, name)
        else:
            check_positive(inter_channels, "inter_channels", name)

        self.channels = channels
        self.mode = mode
        self.dim = dim
        self.sub_sample = sub_sample
        self.inter_channels = inter_channels
        self.scale = scale
        self.implementation = implementation
        self.pool_input = pool_input
        # The fused kernels apply their scale to θᵀφ; 1.0 is the paper's (unscaled) form.
        key_channels = channels if mode == "gaussian" else inter_channels
        self.scale_factor = 1.0 / math.sqrt(key_channels) if scale else 1.0
        self.fused = implementation != "explicit" and mode != "concat"

        conv = _CONV[dim]
        if mode == "gaussian":
            # f(x_i, x_j) = exp(x_iᵀ x_j) compares the raw features: no embedding.
            self.theta: nn.Module = nn.Identity()
            self.phi: nn.Module = nn.Identity()
        else:
            self.theta = conv(channels, inter_channels, kernel_size=1)
            self.phi = conv(channels, inter_channels, kernel_size=1)
        self.g = conv(channels, inter_channels, kernel_size=1)
        self.w_f = nn.Linear(2 * inter_channels, 1, bias=False) if mode == "concat" else None
        self.pool = _MAX_POOL[dim](kernel_size=_POOL_KERNEL[dim]) if sub_sample else nn.Identity()
        pooled = tuple(axis for axis, k in enumerate(_POOL_KERNEL[dim]) if k > 1)
        self._pooled_axes = pooled if sub_sample else ()

        self.w_z = conv(inter_channels, channels, kernel_size=1)
        if bn_layer:
            self.bn: nn.Module = _BATCH_NORM[dim](channels)
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        else:
            self.bn = nn.Identity()
            nn.init.zeros_(self.w_z.weight)
            nn.init.zeros_(self.w_z.bias)
        self.bn_layer = bn_layer

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries θ ``[B, N, d]``, keys φ ``[B, N', d]`` and values g ``[B, N', d]`` of
        ``x: [B, C, *S]`` (``d = C`` for θ and φ in gaussian mode), positions flattened."""
        theta = self.theta(x)
        if self.pool_input:
            x_hat = self.pool(x)
            phi, g = self.phi(x_hat), self.g(x_hat)
        else:
            phi, g = self.pool(self.phi(x)), self.pool(self.g(x))
        # [B, d, *S] -> [B, N, d]: one row per position, as in "y_i = sum_j ...".
        # Contiguous [B, N, d]: on non-contiguous inputs the fused attention kernels silently
        # fall back to the path that builds the N x N' map.
        return tuple(t.flatten(2).transpose(1, 2).contiguous() for t in (theta, phi, g))

    def pairwise_weights(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """The map ``f(x_i, x_j) / C(x)``, ``[B, N, N']``, from θ ``[B, N, d]`` and
        φ ``[B, N', d]``."""
        n_keys = phi.shape[1]
        if self.mode == "concat":
            d = self.inter_channels
            # w_fᵀ[θ_i; φ_j] = w_θᵀθ_i + w_φᵀφ_j: an [N, 1] + [1, N'] broadcast sum, so no
            # [2d, N, N'] tensor of concatenated pairs is ever built.
            query_term = F.linear(theta, self.w_f.weight[:, :d])  # [B, N, 1]
            key_term = F.linear(phi, self.w_f.weight[:, d:])  # [B, N', 1]
            return F.relu(query_term + key_term.transpose(1, 2)) / n_keys
        logits = theta @ phi.transpose(1, 2)
        if self.mode == "dot":
            return logits / n_keys  # C(x) = N'; never scaled (refused in __init__)
        if self.scale:
            logits = logits * self.scale_factor
        # Softmax statistics (max, sum of exponentials) in at least float32, also under bf16
        # autocast; float64 stays float64.
        return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))

    def aggregate(self, theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``y = (1 / C(x)) sum_j f(x_i, x_j) g(x_j)``, ``[B, N, d]``, without storing the map."""
        if self.mode == "dot":
            # Re-associated: θ (φᵀ g) costs O(N d²) instead of O(N N' d) and builds no N x N'.
            context = phi.transpose(1, 2) @ g  # [B, d, d]
            return (theta @ context) / phi.shape[1]
        y = F.scaled_dot_product_attention(
            theta.unsqueeze(1), phi.unsqueeze(1), g.unsqueeze(1), scale=self.scale_factor
        )
        return y.squeeze(1)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``[B, C, *S] -> [B, C, *S]``; with ``return_attention=True`` also the ``[B, N, N']``
        map of weights that was applied (see the class docstring)."""
        name = type(self).__name__
        check_feature_map(x, self.channels, name, dims=(self.dim + 2,))
        spatial = x.shape[2:]
        if any(spatial[axis] < 2 for axis in self._pooled_axes):
            # A size-1 axis would pool to 0 positions: no keys to attend to.
            pooled = ", ".join(_AXIS_NAMES[self.dim][axis] for axis in self._pooled_axes)
            raise ValueError(
                f"{name}: sub_sample max-pools {pooled} by 2, expected each of them >= 2, "
                f"got shape {list(x.shape)}"
            )

        theta, phi, g = self.embed(x)
        if return_attention or not self.fused:
            attention = self.pairwise_weights(theta, phi)
            y = attention.to(g.dtype) @ g
        else:
            attention = None
            y = self.aggregate(theta, phi, g)

        # W_z is a 1x1 convolution, i.e. one [C, d] matrix applied at every position. Written as
        # [C, d] @ [B, d, N] its result is a fresh, contiguous [B, C, N] whose reshape to
        # [B, C, *S] is a plain view. Two PyTorch bugs make this more than style: Inductor fails
        # on a convolution of a batched-matmul output once shapes turn dynamic
        # (pytorch/pytorch#172204), and BatchNorm's CPU backward returns wrong gradients for a
        # batch-of-1 input with transposed strides (found while testing with gradcheck).
        w_z_y = self.w_z.weight.flatten(1) @ y.transpose(1, 2) + self.w_z.bias[:, None]
        z = self.bn(w_z_y.reshape(x.shape)) + x
        return (z, attention) if return_attention else z

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, mode={self.mode!r}, dim={self.dim}, "
            f"inter_channels={self.inter_channels}, sub_sample={self.sub_sample}, "
            f"bn_layer={self.bn_layer}, scale={self.scale}, "
            f"implementation={self.implementation!r}, pool_input={self.pool_input}"
        )
