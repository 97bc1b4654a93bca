"""Backbones with a slot for attention: CIFAR ResNets and (for triple attention) DenseNet-121."""
from .resnet import BasicBlock, ResNet, resnet18, resnet34

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34", "densenet121", "build_model", "MODELS"]


def densenet121(num_classes: int = 10, attention: str | None = None, **kwargs):
    """CIFAR DenseNet-121; ``attention=None | "triple"`` (see :mod:`attn_lib.models.densenet`)."""
    from .densenet import densenet121 as _densenet121

    return _densenet121(num_classes, attention=attention, **kwargs)


MODELS = {"resnet18": resnet18, "resnet34": resnet34, "densenet121": densenet121}


def build_model(name: str, num_classes: int, attention: str | None = None, **kwargs):
    """Build a backbone by name (``resnet18``, ``resnet34``, ``densenet121``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](num_classes, attention=attention, **kwargs)
