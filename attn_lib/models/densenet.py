"""DenseNet-121 for 32x32 images, plain or with triple attention (A3Net).

DenseNet (Huang, Liu, van der Maaten, Weinberger; CVPR 2017): inside a *dense block* every layer
receives the concatenation of all earlier feature maps of the block and adds ``growth_rate`` new
ones. A layer is the pre-activation bottleneck ``BN-ReLU-conv1x1(bn_size * k)-BN-ReLU-conv3x3(k)``;
between blocks a *transition* ``BN-ReLU-conv1x1(compression * C)-avgpool2x2`` halves the width and
the resolution. DenseNet-121 has (6, 12, 24, 16) layers per block and k = 32.

The CIFAR variant built here replaces the ImageNet stem (7x7 stride-2 convolution + 3x3 max-pool)
by one 3x3 convolution with stride 1 and no pooling, so a 32x32 image gives blocks at 32, 16, 8 and
4 pixels with 256, 512, 1024 and 1024 output channels. The stem is a bare convolution: every dense
layer starts with its own BN-ReLU. ``densenet121(num_classes=10)`` has 6,956,298 parameters
(the count usually quoted for a CIFAR DenseNet-121, about 6.96 M).

Triple attention (``attention="triple"``; Wang et al., Medical Image Analysis 2021, A3Net; see
:mod:`attn_lib.modules.triple` for what is reconstructed and why) adds three pieces around the
backbone's last feature map X = ReLU(BN(block 4)) ([B, 1024, 4, 4] on CIFAR)::

    X_CA   = ChannelWiseAttention(X)                      # SE gate, [B, 1024, 4, 4]
    aux    = ElementWiseAttention(X_CA)                   # class attention x score maps, [B, K]
    F      = ScaleWiseAttention([block 2, block 3, X_CA]) # weighted sum over depths, [B, 1024, 4, 4]
    logits = Linear(GAP(F))                               # [B, K]

``densenet121(10, attention="triple")`` has 12,681,825 parameters: the channel-wise gate adds
132,160, the element-wise branch 2,899,988 (its 3x3 convolution at 512 channels is most of it) and
the scale-wise attention 2,693,379 (mostly the 1x1 projections of blocks 2, 3 and 4 to 1024).

The element-wise branch is a side branch: its pooled score vector ``aux`` is trained with its own
cross-entropy and shapes the shared features through that loss; it does not gate the features that
reach the classifier. The training step is therefore::

    if model.auxiliary_loss_weight > 0:
        logits, aux = model(x, return_aux=True)
        loss = F.cross_entropy(logits, y) + model.auxiliary_loss_weight * F.cross_entropy(aux, y)

The paper is multi-label (14 diseases, sigmoid outputs, a class-weighted cross-entropy against the
label imbalance of ChestX-ray14); CIFAR is single-label with balanced classes, so both heads are
trained with the ordinary (uniformly weighted) softmax cross-entropy.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "densenet121", "ATTENTIONS", "PARTS"]

#: The values ``attention=`` accepts (``None`` is the plain network).
ATTENTIONS = ("triple",)
#: The three parts of triple attention; ``parts=`` keeps a subset (each one alone, for ablations).
PARTS = ("channel", "element", "scale")


class DenseLayer(nn.Module):
    """``BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k)``: ``[B, C_in, H, W] -> [B, k, H, W]``.

    The 1x1 bottleneck caps the cost of the 3x3 convolution however wide the concatenated input
    grows (DenseNet-B)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; ``[B, C_in, H, W] -> [B, C_in + num_layers * k, H, W]``.

    Each layer reads the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size) for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """``BN-ReLU-conv1x1-avgpool2x2``: ``[B, C_in, H, W] -> [B, C_out, H/2, W/2]`` (DenseNet-C)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


def _positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DenseNet: expected {what} to be a positive integer, got {value!r}")
    return value


class DenseNet(nn.Module):
    """A CIFAR DenseNet-BC, optionally with triple attention (see the module docstring).

    Args:
        num_classes: K, the size of the classifier's output (and of the auxiliary score vector).
        attention: ``None`` or ``"triple"``; anything else raises ``ValueError``.
        growth_rate: k, channels added by each dense layer (32 for DenseNet-121).
        block_config: dense layers per block ((6, 12, 24, 16) for DenseNet-121).
        num_init_features: channels of the stem convolution (2k = 64).
        bn_size: bottleneck width factor; the 1x1 convolution has ``bn_size * k`` channels.
        compression: θ, the fraction of channels a transition keeps (0.5).
        in_channels: image channels (3).
        aux_weight: weight w of the element-wise branch's cross-entropy; stored as
            :attr:`auxiliary_loss_weight`. Default 1.0 with triple attention (the paper's value is
            not known; 1 gives both heads equal say), 0.0 without, where passing it is an error.
        hidden: width of the element-wise attention estimator f_att (512 in the paper).
        reduction: r of the channel-wise (SE) gate (16).
        scale_blocks: the dense blocks (1-based) whose outputs the scale-wise attention weighs;
            must end with the last block, whose entry is the channel-attended feature map.
        scale_reduction: r of the scale-wise attention's fuse layer (16).
        parts: which of ``"channel"``, ``"element"``, ``"scale"`` to build (all three by default).
            A part left out is skipped: no channel gate means ``X_CA = X``; no element-wise branch
            means no auxiliary head (``auxiliary_loss_weight`` 0, ``return_aux`` refused); no
            scale-wise attention means the classifier reads ``X_CA`` directly.

    Attributes:
        auxiliary_loss_weight (float): w above; 0.0 means there is no auxiliary head.
        num_features (int): channels of the last feature map (1024 for DenseNet-121).
    """

    def __init__(self, num_classes: int = 10, attention: str | None = None, growth_rate: int = 32,
                 block_config: Sequence[int] = (6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, compression: float = 0.5, in_channels: int = 3,
                 aux_weight: float | None = None, hidden: int | None = None,
                 reduction: int | None = None, scale_blocks: Sequence[int] | None = None,
                 scale_reduction: int | None = None, parts: Sequence[str] | None = None):
        super().__init__()
        if attention is not None and (not isinstance(attention, str) or attention.lower() not in ATTENTIONS):
            raise ValueError(
                f"DenseNet: unknown attention {attention!r}; expected None or one of {', '.join(ATTENTIONS)}"
            )
        self.attention = None if attention is None else attention.lower()
        triple_options = {"aux_weight": aux_weight, "hidden": hidden, "reduction": reduction, "parts": parts,
                          "scale_blocks": scale_blocks, "scale_reduction": scale_reduction}
        given = sorted(k for k, v in triple_options.items() if v is not None)
        if self.attention is None and given:
            raise ValueError(f"DenseNet: triple-attention options {given} given without attention='triple'")
        self.num_classes = _positive_int(num_classes, "num_classes")
        _positive_int(growth_rate, "growth_rate")
        _positive_int(num_init_features, "num_init_features")
        _positive_int(bn_size, "bn_size")
        _positive_int(in_channels, "in_channels")
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
            raise ValueError(f"DenseNet: expected block_config to be a non-empty sequence, got {block_config!r}")
        for n in block_config:
            _positive_int(n, "every entry of block_config")
        if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not 0 < compression <= 1:
            raise ValueError(f"DenseNet: expected compression in (0, 1], got {compression!r}")
        n_blocks = len(block_config)
        if self.attention == "triple":
            # Checked before any layer is built, so a wrong option fails at once.
            scale_blocks = tuple(range(2, n_blocks + 1)) if scale_blocks is None else tuple(scale_blocks)
            if (not scale_blocks or list(scale_blocks) != sorted(set(scale_blocks))
                    or not set(scale_blocks) <= set(range(1, n_blocks + 1)) or scale_blocks[-1] != n_blocks):
                raise ValueError(
                    f"DenseNet: expected scale_blocks to be increasing block numbers among 1..{n_blocks} "
                    f"ending with the last block {n_blocks}, got {scale_blocks!r}"
                )
            aux_weight = 1.0 if aux_weight is None else aux_weight
            if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or not aux_weight > 0:
                raise ValueError(f"DenseNet: expected aux_weight > 0 with triple attention, got {aux_weight!r}")
            parts = PARTS if parts is None else parts
            if (isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or not parts
                    or not set(parts) <= set(PARTS) or len(set(parts)) != len(parts)):
                raise ValueError(f"DenseNet: expected parts to be a non-empty selection of {PARTS}, got {parts!r}")
        #: The parts of triple attention this network has (empty without attention).
        self.parts = tuple(p for p in PARTS if p in parts) if self.attention == "triple" else ()
        #: Weight of the element-wise branch's loss in the training step; 0.0 means no auxiliary head.
        self.auxiliary_loss_weight = float(aux_weight) if "element" in self.parts else 0.0
        self.scale_blocks = scale_blocks if self.attention == "triple" else ()

        self.in_channels = in_channels
        self.stem = nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        block_channels: list[int] = []
        channels = num_init_features
        for index, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size)
            self.blocks.append(block)
            channels = block.out_channels
            block_channels.append(channels)
            if index < len(block_config) - 1:
                out = int(channels * compression)
                if out < 1:
                    raise ValueError(
                        f"DenseNet: compression {compression} leaves {channels} * {compression} < 1 channel"
                    )
                self.transitions.append(Transition(channels, out))
                channels = out
        self.norm = nn.BatchNorm2d(channels)
        self.num_features = channels
        self.block_channels = tuple(block_channels)

        if self.attention == "triple":
            from ..modules.triple import ChannelWiseAttention, ElementWiseAttention, ScaleWiseAttention

            if "channel" in self.parts:
                self.channel_attention = ChannelWiseAttention(
                    channels, **({} if reduction is None else {"reduction": reduction}))
            if "element" in self.parts:
                self.element_attention = ElementWiseAttention(
                    channels, num_classes, **({} if hidden is None else {"hidden": hidden}))
            if "scale" in self.parts:
                # The last block's entry is X_CA, the normalised and channel-attended map (num_features wide).
                scale_in = tuple(block_channels[b - 1] for b in scale_blocks[:-1]) + (channels,)
                self.scale_attention = ScaleWiseAttention(
                    channels, in_channels=scale_in,
                    **({} if scale_reduction is None else {"reduction": scale_reduction}))
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Backbone only: the attention modules initialise themselves (their docstrings say how).
        # He-normal with fan_in, as torchvision's DenseNet: with fan_out the activations grow along
        # the 58 concatenating layers and an untrained model in eval mode saturates every gate.
        backbone = [self.stem, self.blocks, self.transitions, self.norm]
        for part in backbone:
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DenseNet: expected images [B, {self.in_channels}, H, W], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"DenseNet: expected a floating-point tensor, got {x.dtype}")

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[B, in_channels, H, W] -> (ReLU(BN(last block)), [output of each dense block])``.

        The last map is ``[B, num_features, H/2^(n-1), W/2^(n-1)]``; block outputs are the raw
        concatenations, before the following transition's BN-ReLU."""
        self._check_images(x)
        x = self.stem(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            outputs.append(x)
            if index < len(self.transitions):
                x = self.transitions[index](x)
        return F.relu(self.norm(x)), outputs

    def forward(self, x: torch.Tensor, return_aux: bool = False, return_attention: bool = False):
        """``[B, in_channels, H, W] -> logits [B, K]``, plus what is asked for.

        ``return_aux=True`` adds ``aux_logits [B, K]``, the element-wise branch's pooled score
        vector; ``return_attention=True`` adds a dict of the attention that was applied:

        * ``"channel"``: ``[B, C, 1, 1]``, the SE gate in (0, 1), ``X_CA = X * channel``;
        * ``"element"``: ``[B, K, h, w]``, the K class attention maps, each a softmax over the
          h*w positions (sums to 1 over dims 2, 3);
        * ``"scores"``: ``[B, K, h, w]``, the per-position class scores S, with
          ``aux_logits == (element * scores).sum((2, 3))``;
        * ``"scale"``: ``[B, S]``, the weights of the S = ``len(scale_blocks)`` depths (sum to 1).

        Both flags combine: ``(logits, aux_logits, attention)``. Only the triple-attention model
        has them; asking the plain one raises ``ValueError``. With ``parts`` leaving some out, the
        entries of the parts that are missing are ``None``.
        """
        if (return_aux or return_attention) and self.attention is None:
            raise ValueError(
                "DenseNet: return_aux / return_attention expected attention='triple', got attention=None"
            )
        features, block_outputs = self.features(x)
        if self.attention is None:
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

        if return_aux and "element" not in self.parts:
            raise ValueError(f"DenseNet: return_aux expected the element-wise part, got parts={self.parts}")
        attended, channel = features, None
        if "channel" in self.parts:
            attended, channel = self.channel_attention(features, return_attention=True)
        element = {"element": None, "scores": None}
        if (return_aux or return_attention) and "element" in self.parts:
            # A side branch: the logits do not depend on it, so inference without it skips it.
            aux_logits, element = self.element_attention(attended, return_attention=True)
        fused, scale = attended, None
        if "scale" in self.parts:
            scales = [block_outputs[b - 1] for b in self.scale_blocks[:-1]] + [attended]
            fused, scale = self.scale_attention(scales, return_attention=True)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1))

        out: tuple = (logits,)
        if return_aux:
            out += (aux_logits,)
        if return_attention:
            out += ({"channel": channel, "element": element["element"], "scores": element["scores"],
                     "scale": scale},)
        return out if len(out) > 1 else logits


def densenet121(num_classes: int = 10, attention: str | None = None, growth_rate: int | None = None,
                block_config: Sequence[int] = (6, 12, 24, 16), num_init_features: int | None = None,
                bn_size: int = 4, compression: float = 0.5, aux_weight: float | None = None,
                width: int | None = None, **kwargs) -> DenseNet:
    """CIFAR DenseNet-121 (k = 32, blocks 6-12-24-16, θ = 0.5); ``attention=None | "triple"``.

    ``kwargs`` go to :class:`DenseNet` (``in_channels``, and for triple attention ``hidden``,
    ``reduction``, ``scale_blocks``, ``scale_reduction``). A smaller ``block_config`` or
    ``growth_rate`` gives a network of the same design that trains in seconds on a CPU.

    ``width`` scales the network as ``width`` scales the course's ResNets, whose standard width
    is 64: it sets the stem to ``width`` channels and the growth rate to ``width // 2`` (DenseNet-121
    has 64 and 32, so ``width=64`` is the standard network). It cannot be combined with
    ``growth_rate`` or ``num_init_features``.
    """
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 2:
            raise ValueError(f"densenet121: expected width to be an integer >= 2, got {width!r}")
        if growth_rate is not None or num_init_features is not None:
            raise ValueError("densenet121: give either width or growth_rate / num_init_features, not both "
                             f"(got width={width}, growth_rate={growth_rate}, "
                             f"num_init_features={num_init_features})")
        growth_rate, num_init_features = width // 2, width
    growth_rate = 32 if growth_rate is None else growth_rate
    num_init_features = 64 if num_init_features is None else num_init_features
    return DenseNet(num_classes, attention, growth_rate=growth_rate, block_config=block_config,
                    num_init_features=num_init_features, bn_size=bn_size, compression=compression,
                    aux_weight=aux_weight, **kwargs)
