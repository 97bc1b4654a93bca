"""Look inside a trained network: the attention each module applied, and Grad-CAM.

    maps = collect_attention(model, x)   # {"layer1.0.gate": tensor [B, C, 1, 1], ...}
    cam = grad_cam(model, x, model.layer4)  # [B, H, W] in [0, 1]
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .registry import _SPECS

__all__ = ["attention_modules", "collect_attention", "grad_cam"]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that are registered mechanisms (by class), by qualified name."""
    classes = tuple(spec.load() for spec in _SPECS.values() if spec.placement != "shared")
    return {name: m for name, m in model.named_modules() if isinstance(m, classes)}


@contextmanager
def _recording(modules: dict[str, nn.Module], store: dict):
    originals = {}
    for name, module in modules.items():
        originals[name] = module.forward

        def forward(x, *args, _orig=module.forward, _name=name, **kwargs):
            y, attention = _orig(x, *args, return_attention=True, **kwargs)
            store[_name] = attention.detach() if torch.is_tensor(attention) else \
                {k: v.detach() for k, v in attention.items()}
            return y
        module.forward = forward
    try:
        yield store
    finally:
        for name, module in modules.items():
            del module.forward  # the instance attribute goes; the class's forward is back


def _check_model_input(model, x) -> None:
    """One clear exception for the mistakes a reader makes calling these from a notebook."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module (a network such as resnet18(10, 'se')), got {type(model).__name__}")
    if not torch.is_tensor(x):
        raise TypeError(f"expected x as a torch.Tensor of images [B, 3, H, W], got {type(x).__name__}"
                        + (" (convert with torch.from_numpy)" if type(x).__module__ == "numpy" else ""))
    channels = getattr(model, "in_channels", 3)
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"expected x of shape [B, {channels}, H, W] (a batch, channels first), got "
                         f"{list(x.shape)}" + (": add a batch axis with x[None]" if x.dim() == 3 else ""))
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images (normalised, as the network was trained on), got {x.dtype}")


@torch.no_grad()
def collect_attention(model: nn.Module, x: torch.Tensor) -> dict:
    """Run ``model(x)`` in eval mode and return every registered module's attention, by name.

    Each value is what that module returns with ``return_attention=True`` (a tensor or a dict of
    tensors, see its docstring). The model is left as it was (its mode included).
    """
    _check_model_input(model, x)
    was_training = model.training
    model.eval()
    store: dict = {}
    try:
        with _recording(attention_modules(model), store):
            model(x)
    finally:
        model.train(was_training)
    return store


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, target: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of ``layer``'s output for class ``target``.

    ``x: [B, 3, H, W]``; ``target: [B]`` (default: the predicted class). Returns ``[B, H, W]``
    maps in [0, 1], upsampled bilinearly to the input size: ReLU of the channel-weighted sum of the
    layer's activations, weights = spatial mean of the gradient of the class score.
    """
    _check_model_input(model, x)
    if not isinstance(layer, nn.Module) or not any(m is layer for m in model.modules()):
        raise ValueError(f"layer {type(layer).__name__} is not a module of the model: pass one of its own "
                         f"layers, e.g. model.layer4")
    if target is not None:
        if not torch.is_tensor(target) or target.shape != (len(x),) or target.is_floating_point():
            raise ValueError(f"expected target of shape [{len(x)}] (one class index per image), got "
                             f"{list(target.shape) if torch.is_tensor(target) else type(target).__name__}")
    was_training = model.training
    model.eval()
    saved = {}
    handle = layer.register_forward_hook(lambda m, i, o: saved.__setitem__("a", o))
    try:
        with torch.enable_grad():
            logits = model(x)
            if target is not None and not ((target >= 0) & (target < logits.shape[1])).all():
                raise ValueError(f"expected class indices in 0..{logits.shape[1] - 1}, got {target.tolist()}")
            target = logits.argmax(1) if target is None else target
            activation = saved["a"]
            score = logits.gather(1, target[:, None]).sum()
            grad, = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return cam / peak


def shared_layout(maps: torch.Tensor) -> dict:
    """How much of a set of per-image maps ``[N, h, w]`` is one layout shared by all images.

    Returns ``mean_map`` (``[h, w]``, the average over images), ``rho`` (numpy ``[N]``: for each
    image, Spearman's rank correlation, from ``scipy.stats.spearmanr``, between its map and the
    mean of the *other* images' maps; NaN for a constant map), and ``variance_explained``: the
    share of the maps' total variance (around their grand mean) that the mean map accounts for,
    ``1 - sum (m_i - mean_map)^2 / sum (m_i - grand mean)^2``.
    """
    import numpy as np
    from scipy import stats

    if not torch.is_tensor(maps) or maps.dim() != 3 or maps.shape[0] < 2:
        raise ValueError(f"expected maps [N, h, w] with N >= 2, got "
                         f"{list(maps.shape) if torch.is_tensor(maps) else type(maps).__name__}")
    m = maps.detach().double().flatten(1).cpu().numpy()
    total = m.sum(0)
    rho = np.full(len(m), np.nan)
    for i, row in enumerate(m):
        others = (total - row) / (len(m) - 1)
        if np.ptp(row) > 0 and np.ptp(others) > 0:
            rho[i] = stats.spearmanr(row, others).statistic
    mean_map = m.mean(0)
    explained = 1 - ((m - mean_map) ** 2).sum() / ((m - m.mean()) ** 2).sum()
    return {"mean_map": torch.from_numpy(mean_map.reshape(maps.shape[1:])), "rho": rho,
            "variance_explained": float(explained)}


__all__ += ["shared_layout"]
