"""ResNet-18/34 for 32x32 images, with one slot per block for an attention mechanism.

The CIFAR variant of He et al. (CVPR 2016) as it is commonly trained on CIFAR: a 3x3 stem with
stride 1 and no max-pool, four stages of :class:`BasicBlock` (64, 128, 256, 512 channels at
32, 16, 8, 4 pixels), global average pooling and a linear classifier.
``resnet18(num_classes=10)`` has 11,173,962 parameters.

Attention plugs in by name (:func:`attn_lib.create_attention`), each mechanism where its paper
puts it (the placement is recorded once, in :mod:`attn_lib.registry`):

* ``"gate"`` (SE, ECA, CBAM): inside every block, on the residual branch *before* the addition,
  ``out = relu(shortcut(x) + gate(branch(x)))``. Gating after the addition (as in the placeholder of
  a widely reposted training script) would also scale the identity path, which is what residual
  learning keeps clean.
* ``"conv"`` (SK): the selective-kernel unit *replaces* the block's second 3x3 convolution; SKNet
  uses it as a convolution, not as a gate added after one. A plain ResNet's convolutions are
  dense, so the backbone builds it with ``groups=1`` unless told otherwise.
* ``"stage"`` (non-local, DANet): one module after the stages listed in ``attention_stages``
  (default: after stage 3, 8x8 = 64 positions on CIFAR), where an N x N map is affordable; the
  papers add a few such blocks to the middle stages of a ResNet, not one per block.
* ``"shared"`` (DIA): one LSTM cell shared by every block of a stage
  (:class:`attn_lib.modules.dia.DIAStage`), gating each block's branch before the addition.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..registry import attention_spec, create_attention

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the residual branch and the shortcut are exposed.

    ``forward_parts(x) -> (branch, shortcut)`` returns the residual branch *before* any gate and
    the shortcut, so that a stage-level mechanism (DIA) can gate the branch itself;
    ``forward(x) = relu(gate(branch) + shortcut)``. The shortcut is a 1x1 convolution + BN
    whenever the stride or the width changes (the seed's block forgot the stride case).
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 gate: nn.Module | None = None, conv2: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv2 if conv2 is not None else conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.gate = gate if gate is not None else nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branch = F.relu(self.bn1(self.conv1(x)), inplace=True)
        branch = self.bn2(self.conv2(branch))
        return branch, self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch, shortcut = self.forward_parts(x)
        return F.relu(self.gate(branch) + shortcut)


class ResNet(nn.Module):
    """A CIFAR ResNet of :class:`BasicBlock` stages; see the module docstring for attention.

    Args:
        blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: size of the classifier's output.
        attention: ``None`` or a name from :func:`attn_lib.available_attentions`.
        width: channels of the first stage (64 in the paper; the stages use 1x, 2x, 4x, 8x).
        attention_stages: for ``"stage"`` mechanisms, the stages (1-4) after which one module is
            inserted.
        **attention_kwargs: passed to every attention module's constructor.
    """

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, attention: str | None = None,
                 width: int = 64, in_channels: int = 3, attention_stages: Iterable[int] = (3,),
                 **attention_kwargs):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"expected num_classes to be a positive integer, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"expected width to be a positive integer, got {width!r}")
        self.attention = None if attention is None else attention_spec(attention).name
        placement = None if attention is None else attention_spec(attention).placement
        if attention is None and attention_kwargs:
            raise ValueError(f"attention options {sorted(attention_kwargs)} given without an attention")
        stages_with_module = set(attention_stages) if placement == "stage" else set()
        if not stages_with_module <= {1, 2, 3, 4}:
            raise ValueError(f"expected attention_stages among 1, 2, 3, 4, got {sorted(attention_stages)}")

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels_in = width
        for index, n_blocks in enumerate(blocks):
            channels = width * 2**index
            stride = 1 if index == 0 else 2
            layer = []
            for b in range(n_blocks):
                gate = conv2 = None
                if placement == "gate":
                    gate = create_attention(self.attention, channels, **attention_kwargs)
                elif placement == "conv":
                    conv2 = create_attention(self.attention, channels, **{"groups": 1, **attention_kwargs})
                layer.append(BasicBlock(channels_in, channels, stride if b == 0 else 1, gate=gate, conv2=conv2))
                channels_in = channels
            if placement == "shared":
                from ..modules.dia import DIAStage

                stage: nn.Module = DIAStage(layer, channels, **attention_kwargs)
            else:
                stage = nn.Sequential(*layer)
            if index + 1 in stages_with_module:
                stage = nn.Sequential(stage, create_attention(self.attention, channels, **attention_kwargs))
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, num_classes)
        self.in_channels = in_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W] -> [B, 8*width, H/8, W/8]``, the last stage's feature map."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {got}")
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W] -> [B, num_classes]`` logits."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def resnet18(num_classes: int = 10, attention: str | None = None, **kwargs) -> ResNet:
    """CIFAR ResNet-18 (2, 2, 2, 2 blocks); ``attention`` as in :class:`ResNet`."""
    return ResNet((2, 2, 2, 2), num_classes, attention, **kwargs)


def resnet34(num_classes: int = 10, attention: str | None = None, **kwargs) -> ResNet:
    """CIFAR ResNet-34 (3, 4, 6, 3 blocks); ``attention`` as in :class:`ResNet`."""
    return ResNet((3, 4, 6, 3), num_classes, attention, **kwargs)
