"""Attention in Vision: the attention mechanisms of convolutional networks, built and tested.

    >>> import attn_lib
    >>> attn_lib.available_attentions()
    ['cbam', 'danet', 'dia', 'eca', 'nonlocal', 'se', 'sk']
    >>> model = attn_lib.models.resnet18(num_classes=10, attention="se")
"""
from . import models
from .registry import attention_spec, available_attentions, create_attention

__version__ = "0.1.0"
__all__ = ["attention_spec", "available_attentions", "create_attention", "models", "__version__"]
