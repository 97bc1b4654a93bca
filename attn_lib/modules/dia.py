"""DIA-LSTM: one attention cell shared by every block of a stage.

Huang, Liang, Liang, Yang, "DIANet: Dense-and-Implicit Attention Network", AAAI 2020
(arXiv:1905.10671).

An SE block gives every residual block its own small network that turns the pooled branch output
into channel gates. DIANet instead *shares* one such network across all blocks of a stage, and
makes it recurrent: the blocks of a stage are the time steps of an LSTM whose input at step ``t``
is the globally pooled residual branch of block ``t`` and whose hidden state ``h_t`` is the
channel gate of that block. The cell state carries what earlier blocks saw to the later ones
("dense and implicit" connections between layers) at the cost of a single cell per stage.

Two classes:

* :class:`DIALSTMCell`, the modified LSTM cell (what ``create_attention("dia", C)`` returns);
* :class:`DIAStage`, a stage of residual blocks that all consult one :class:`DIALSTMCell`
  (what ``attn_lib.models.resnet18(attention="dia")`` builds, one per stage).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from ._checks import check_feature_map, check_positive, reduced_channels

__all__ = ["DIALSTMCell", "DIAStage", "collect_dia"]

#: An LSTM state ``(h, c)``, each ``[B, C]``.
State = tuple[torch.Tensor, torch.Tensor]


def _bottleneck(channels: int, hidden: int) -> nn.Sequential:
    """``Linear(C, C/r) -> ReLU -> Linear(C/r, 4C)``: the four gates' pre-activations at once."""
    return nn.Sequential(
        nn.Linear(channels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 4 * channels),
    )


class DIALSTMCell(nn.Module):
    r"""The DIA-LSTM cell: an LSTM cell with bottleneck maps and a sigmoid output.

    For the pooled feature vector ``x_t`` of block ``t`` and the previous state
    ``(h_{t-1}, c_{t-1})``, with :math:`\delta` = ReLU and :math:`\sigma` = sigmoid:

    .. math::

        [\,\hat\imath;\ \hat f;\ \hat g;\ \hat o\,] &= W^{ih}_2\,\delta(W^{ih}_1 x_t)
            + W^{hh}_2\,\delta(W^{hh}_1 h_{t-1})
            \qquad (W_1: C \to C/r,\ W_2: C/r \to 4C)\\
        c_t &= \sigma(\hat f) \odot c_{t-1} + \sigma(\hat\imath) \odot \tanh(\hat g)\\
        h_t &= \sigma(\hat o) \odot \sigma(c_t)

    Two changes from a standard LSTM cell, both from the paper:

    * the input-to-hidden and hidden-to-hidden maps are bottlenecks ``C -> C/r -> 4C`` (with a
      ReLU between), as in SE, so a cell costs about ``2.5 C^2`` parameters instead of ``8 C^2``;
    * the output uses ``sigmoid(c_t)`` where an LSTM has ``tanh(c_t)``, so ``h_t`` lies in
      ``(0, 1)`` and can be used directly as a channel gate.

    Differences from the official code (gbup-group/DIANet, ``models/cifar/dia_resnet.py``): its
    ``LSTMCell`` takes a number of layers and a dropout probability, but every network there is
    built with one layer, and its dropout only feeds a next layer, so with one layer it has no
    effect. This cell is that one layer, without dropout. Like the official code, both
    bottlenecks have biases and keep PyTorch's default initialisation.

    Args:
        channels: ``C``, the number of channels of the feature map being gated.
        reduction: ``r``, the bottleneck's reduction ratio (4 in the paper and its code); the
            hidden width is ``C // r``, and a ratio that leaves no hidden unit raises
            ``ValueError``.

    Shapes:
        * ``x``: ``[B, C]``, the globally average-pooled residual branch. A feature map
          ``[B, C, H, W]`` is also accepted and average-pooled over ``H, W`` first.
        * ``state``: ``(h, c)``, each ``[B, C]``, or ``None`` for the zero state of a stage's
          first block (created with the input's device and dtype).
        * returns ``(h, c)``, each ``[B, C]``; ``h`` in ``(0, 1)`` is the channel gate.

    With ``return_attention=True`` it returns ``((h, c), attention)``, ``attention`` a dict of
    ``[B, C]`` tensors: ``"attention"`` (``h``, the gate a block applies), ``"input_gate"``,
    ``"forget_gate"``, ``"output_gate"`` (:math:`\sigma(\hat\imath), \sigma(\hat f),
    \sigma(\hat o)`) and ``"candidate"`` (:math:`\tanh(\hat g)`).

    Where it sits: one cell per stage, shared by all the stage's blocks; see :class:`DIAStage`.
    On its own it is not a feature-map-to-feature-map module like SE: it maps a pooled vector and
    a state to a new state.
    """

    def __init__(self, channels: int, reduction: float = 4):
        super().__init__()
        name = type(self).__name__
        self.hidden = reduced_channels(channels, reduction, name)
        self.channels = channels
        self.reduction = reduction
        self.w_ih = _bottleneck(channels, self.hidden)
        self.w_hh = _bottleneck(channels, self.hidden)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, hidden={self.hidden}"

    def forward(
        self, x: torch.Tensor, state: State | None = None, return_attention: bool = False
    ) -> Union[State, tuple[State, dict[str, torch.Tensor]]]:
        check_feature_map(x, self.channels, type(self).__name__, dims=(2, 4))
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        if state is None:
            # new_zeros: the state follows the input's device and dtype (a CPU float32 zero state
            # breaks a model moved to the GPU or to float64).
            h = c = x.new_zeros(x.shape)
        else:
            h, c = self._check_state(state, x)

        gates = self.w_ih(x) + self.w_hh(h)
        i, f, g, o = gates.chunk(4, dim=1)
        input_gate, forget_gate, output_gate = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        candidate = torch.tanh(g)
        c = forget_gate * c + input_gate * candidate
        # sigmoid, not the LSTM's tanh: h must be a gate in (0, 1), not a signed value.
        h = output_gate * torch.sigmoid(c)
        if not return_attention:
            return h, c
        attention = {
            "attention": h,
            "input_gate": input_gate,
            "forget_gate": forget_gate,
            "output_gate": output_gate,
            "candidate": candidate,
        }
        return (h, c), attention

    def _check_state(self, state: State, x: torch.Tensor) -> State:
        name = type(self).__name__
        expected = [x.shape[0], self.channels]
        if not isinstance(state, (tuple, list)):
            raise ValueError(f"{name}: expected state (h, c) or None, got {type(state).__name__}")
        if len(state) != 2:
            raise ValueError(
                f"{name}: expected state (h, c) or None, got {type(state).__name__} of length {len(state)}"
            )
        for label, tensor in zip(("h", "c"), state):
            if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != expected:
                got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name}: expected state {label} of shape {expected}, got {got}")
        return state[0], state[1]


class DIAStage(nn.Module):
    r"""A stage of residual blocks that share one :class:`DIALSTMCell` (DIANet, AAAI 2020).

    For blocks :math:`t = 1 \dots T` with residual branch :math:`F_t` and shortcut :math:`S_t`:

    .. math::

        u_t = F_t(x_{t-1}), \quad (h_t, c_t) = \mathrm{cell}(\mathrm{GAP}(u_t), (h_{t-1}, c_{t-1})),
        \quad x_t = \mathrm{ReLU}(u_t \odot h_t + S_t(x_{t-1})),

    with :math:`(h_0, c_0) = 0` at the start of every forward pass: the state runs along the
    depth of one stage, not across stages or across batches.

    As SE does, the gate scales the residual branch *before* the addition, leaving the identity
    path untouched. The official repository's ``BasicBlock`` variant differs: it gates the block's
    output *after* the addition and ReLU, pools that output as the cell's input, and then adds
    the pooled branch vector (``[B, C, 1, 1]``, broadcast over the map) where the shortcut should
    be. That scales the identity path and replaces a feature map by a per-channel constant; the
    paper's results come from its ``Bottleneck`` variant, which returns ``(branch, shortcut)``
    and is what this class follows by default. ``variant="official_basic"`` reproduces the
    ``BasicBlock`` variant, so that the two can be compared:

    .. math::

        v_t = \mathrm{ReLU}(u_t + S_t(x_{t-1})), \quad
        (h_t, c_t) = \mathrm{cell}(\mathrm{GAP}(v_t), (h_{t-1}, c_{t-1})), \quad
        x_t = \mathrm{ReLU}(v_t \odot h_t + \mathrm{GAP}(u_t)).

    Args:
        blocks: the stage's residual blocks, in order; each must have
            ``forward_parts(x) -> (branch, shortcut)`` returning the residual branch before any
            gate and the shortcut (see :class:`attn_lib.models.resnet.BasicBlock`). Stored as
            ``self.blocks`` (an ``nn.ModuleList``).
        channels: ``C``, the stage's output width (the width of every branch).
        reduction: the cell's ``r`` (4 in the paper).
        in_channels: channels of the stage's input; by default those of the first block's first
            ``nn.Conv2d``. Only used to check the input.
        variant: ``"branch"`` (default: gate the residual branch before the addition, the
            paper's Bottleneck form) or ``"official_basic"`` (the official BasicBlock variant
            above, for comparison).

    Shapes: ``x: [B, in_channels, H, W] -> [B, C, H', W']`` (``H', W'`` after the first
    block's stride). With ``return_attention=True`` returns ``(y, {"gates": g, "cells": c})``,
    both of shape ``[B, T, C]``: ``g[:, t]`` is the gate ``h_t`` the cell gave block ``t`` and
    ``c[:, t]`` the cell state ``c_t`` it carried on to block ``t + 1``.
    """

    VARIANTS = ("branch", "official_basic")

    def __init__(self, blocks: Sequence[nn.Module], channels: int, reduction: float = 4,
                 in_channels: int | None = None, variant: str = "branch"):
        super().__init__()
        name = type(self).__name__
        if variant not in self.VARIANTS:
            raise ValueError(f"{name}: expected variant to be one of {', '.join(map(repr, self.VARIANTS))}, "
                             f"got {variant!r}")
        self.variant = variant
        blocks = list(blocks)
        if not blocks:
            raise ValueError(f"{name}: expected at least one block, got none")
        for index, block in enumerate(blocks):
            if not callable(getattr(block, "forward_parts", None)):
                raise ValueError(
                    f"{name}: expected blocks with forward_parts(x) -> (branch, shortcut), "
                    f"got {type(block).__name__} at position {index}"
                )
        if in_channels is None:
            in_channels = next((m.in_channels for m in blocks[0].modules() if isinstance(m, nn.Conv2d)), None)
            if in_channels is None:
                raise ValueError(
                    f"{name}: expected in_channels, or a first block containing an nn.Conv2d to read "
                    f"it from, got {type(blocks[0]).__name__} without one"
                )
        self.in_channels = check_positive(in_channels, "in_channels", name)
        self.channels = check_positive(channels, "channels", name)
        self.blocks = nn.ModuleList(blocks)
        self.cell = DIALSTMCell(channels, reduction)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        name = type(self).__name__
        check_feature_map(x, self.in_channels, name)
        state: State | None = None
        gates, cells = [], []
        for block in self.blocks:
            branch, shortcut = block.forward_parts(x)
            check_feature_map(branch, self.channels, f"{name} ({type(block).__name__} branch)")
            if self.variant == "branch":
                state = self.cell(branch.mean(dim=(2, 3)), state)
                x = F.relu(branch * state[0][:, :, None, None] + shortcut)
            else:  # the official BasicBlock: gate after the addition, a pooled branch for a shortcut
                added = F.relu(branch + shortcut)
                state = self.cell(added.mean(dim=(2, 3)), state)
                x = F.relu(added * state[0][:, :, None, None] + branch.mean(dim=(2, 3), keepdim=True))
            gates.append(state[0])
            cells.append(state[1])
        if not return_attention:
            return x
        return x, {"gates": torch.stack(gates, dim=1), "cells": torch.stack(cells, dim=1)}

    def extra_repr(self) -> str:
        return "" if self.variant == "branch" else f"variant={self.variant!r}"


@torch.no_grad()
def collect_dia(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``model(x)`` in eval mode; return each :class:`DIAStage`'s attention, by stage name.

    ``{"layer1": {"gates": [B, T, C], "cells": [B, T, C]}, ...}`` (see :class:`DIAStage`). The
    model is left as it was (its mode included). Raises ``ValueError`` for a model without a
    :class:`DIAStage` (:func:`attn_lib.inspect.collect_attention` covers the per-block mechanisms).
    """
    stages = {name: m for name, m in model.named_modules() if isinstance(m, DIAStage)}
    if not stages:
        raise ValueError(f"expected a model with DIAStage modules (e.g. resnet18(attention='dia')), "
                         f"got {type(model).__name__} without one")
    store: dict[str, dict[str, torch.Tensor]] = {}

    def recording(stage_name: str, stage: DIAStage):
        def forward(inputs: torch.Tensor) -> torch.Tensor:
            y, attention = DIAStage.forward(stage, inputs, return_attention=True)
            store[stage_name] = {k: v.detach() for k, v in attention.items()}
            return y
        return forward

    was_training = model.training
    model.eval()
    try:
        for stage_name, stage in stages.items():
            stage.forward = recording(stage_name, stage)
        model(x)
    finally:
        for stage in stages.values():
            del stage.forward  # the instance attribute goes; the class's forward is back
        model.train(was_training)
    return store
