"""One name for each mechanism, and where a backbone puts it.

``create_attention("se", 64)`` builds a module; ``available_attentions()`` lists the names.
The table below is the single place that maps a name to its class and to its *placement* in a
backbone, so that ``resnet18(attention="cbam")`` and ``create_attention("cbam", C)`` can never
disagree. Classes are imported lazily: importing :mod:`attn_lib` stays cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionSpec", "available_attentions", "attention_spec", "create_attention"]

#: Where a mechanism sits in a residual network (see :mod:`attn_lib.models.resnet`).
#: ``"gate"``: inside every block, on the residual branch before the addition (SE, ECA, CBAM).
#: ``"conv"``: replaces the block's second 3x3 convolution (SK is a convolution, not a gate).
#: ``"stage"``: one module between two stages, where N x N attention is affordable (non-local,
#: DANet). ``"shared"``: one module shared by all blocks of a stage (DIA).
PLACEMENTS = ("gate", "conv", "stage", "shared")


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    target: str  # "package.module:ClassName"
    placement: str
    summary: str

    def load(self) -> type[nn.Module]:
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)


_SPECS = {
    spec.name: spec
    for spec in [
        AttentionSpec("se", "attn_lib.modules.se:SqueezeExcitation", "gate",
                      "Squeeze-and-Excitation (Hu et al., CVPR 2018)"),
        AttentionSpec("eca", "attn_lib.modules.eca:EfficientChannelAttention", "gate",
                      "Efficient Channel Attention (Wang et al., CVPR 2020)"),
        AttentionSpec("sk", "attn_lib.modules.sk:SelectiveKernel", "conv",
                      "Selective Kernel convolution (Li et al., CVPR 2019)"),
        AttentionSpec("cbam", "attn_lib.modules.cbam:CBAM", "gate",
                      "Convolutional Block Attention Module (Woo et al., ECCV 2018)"),
        AttentionSpec("danet", "attn_lib.modules.danet:DualAttention", "stage",
                      "Dual attention: position + channel (Fu et al., CVPR 2019)"),
        AttentionSpec("nonlocal", "attn_lib.modules.nonlocal_block:NonLocalBlock", "stage",
                      "Non-local block (Wang et al., CVPR 2018)"),
        AttentionSpec("dia", "attn_lib.modules.dia:DIALSTMCell", "shared",
                      "Dense-and-Implicit Attention, DIA-LSTM (Huang et al., AAAI 2020)"),
    ]
}


def available_attentions() -> list[str]:
    """The names accepted by :func:`create_attention` and by the backbones' ``attention=``."""
    return sorted(_SPECS)


def attention_spec(name: str) -> AttentionSpec:
    """The :class:`AttentionSpec` for ``name``; ``ValueError`` listing valid names otherwise."""
    if not isinstance(name, str) or name.lower() not in _SPECS:
        raise ValueError(
            f"unknown attention {name!r}; expected one of {', '.join(available_attentions())}"
        )
    return _SPECS[name.lower()]


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the attention module ``name`` for a feature map with ``channels`` channels.

    >>> create_attention("se", 64)          # doctest: +SKIP
    SqueezeExcitation(channels=64, reduction=16, hidden=4)

    ``kwargs`` go to the module's constructor (e.g. ``reduction=8`` for SE). ``"dia"`` returns the
    shared LSTM cell; a backbone shares one such cell across all blocks of a stage.
    """
    spec = attention_spec(name)
    return spec.load()(channels, **kwargs)
