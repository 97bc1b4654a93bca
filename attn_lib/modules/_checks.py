"""Input checks shared by every module: a wrong input fails here, with a message that says what
was expected and what came, before a layer deep inside fails with a message of its own."""
from __future__ import annotations

import torch


def check_feature_map(x: torch.Tensor, channels: int, name: str, dims: tuple[int, ...] = (4,)) -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor ``[B, channels, *spatial]`` with ``x.dim()`` in
    ``dims`` (4 means ``[B, C, H, W]``)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        shapes = " or ".join(_shape_name(d) for d in dims)
        raise ValueError(f"{name}: expected a {shapes} tensor, got shape {list(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels (dim 1), got {x.shape[1]} in shape {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def check_positive(value: int, what: str, name: str) -> int:
    """Raise ``ValueError`` unless ``value`` is a positive int; return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected {what} to be a positive integer, got {value!r}")
    return value


def reduced_channels(channels: int, reduction: float, name: str) -> int:
    """Hidden width ``int(channels // reduction)`` of a bottleneck.

    ``ValueError`` when it would be zero (the silent bug of much circulating code: ``C // 16 == 0`` for
    ``C < 16`` builds an empty layer whose output is a constant), naming the largest reduction
    that works, and for a non-positive ``channels`` or ``reduction``."""
    check_positive(channels, "channels", name)
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or reduction <= 0:
        raise ValueError(f"{name}: expected a positive reduction ratio, got {reduction!r}")
    hidden = int(channels // reduction)
    if hidden < 1:
        raise ValueError(
            f"{name}: reduction {reduction} leaves {channels} // {reduction} = 0 hidden channels; "
            f"expected reduction <= {channels} for {channels} channels"
        )
    return hidden


def _shape_name(d: int) -> str:
    return {3: "[B, C, T]", 4: "[B, C, H, W]", 5: "[B, C, T, H, W]"}.get(d, f"{d}-D")
