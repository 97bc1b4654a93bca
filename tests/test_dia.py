"""DIA-LSTM (Huang et al., AAAI 2020): the cell against its equations, the shared-cell stage
against a hand-written loop, and the pitfalls of the circulating DIA code."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_lib import create_attention
from attn_lib.models import resnet18
from attn_lib.models.resnet import BasicBlock
from attn_lib.modules.dia import DIALSTMCell, DIAStage, collect_dia

C = 16


def reference_cell(cell: DIALSTMCell, x, h, c):
    """One DIA-LSTM step from the paper's equations, one gate at a time, with the cell's weights."""
    channels = cell.channels

    def bottleneck(seq, v, gate):  # gate 0, 1, 2, 3 = i, f, g, o: rows of W2 for that gate
        w1, b1, w2, b2 = seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias
        z = torch.clamp(torch.einsum("kc,bc->bk", w1, v) + b1, min=0)
        rows = slice(gate * channels, (gate + 1) * channels)
        return torch.einsum("ck,bk->bc", w2[rows], z) + b2[rows]

    def sigmoid(t):
        return 1 / (1 + torch.exp(-t))

    pre = [bottleneck(cell.w_ih, x, k) + bottleneck(cell.w_hh, h, k) for k in range(4)]
    i, f, g, o = sigmoid(pre[0]), sigmoid(pre[1]), torch.tanh(pre[2]), sigmoid(pre[3])
    c_new = f * c + i * g
    return o * sigmoid(c_new), c_new


def reference_stage(stage: DIAStage, x, official_basic: bool = False):
    """The stage as a plain loop: gate each block's branch with the shared cell, then add.

    ``official_basic``: the official BasicBlock variant instead (gate after the addition, the
    pooled branch added in place of the shortcut)."""
    h = c = torch.zeros(x.shape[0], stage.channels, dtype=x.dtype)
    gates, cells = [], []
    for block in stage.blocks:
        branch, shortcut = block.forward_parts(x)
        if official_basic:
            added = torch.relu(branch + shortcut)
            h, c = reference_cell(stage.cell, added.mean(dim=(2, 3)), h, c)
            x = torch.relu(added * h[:, :, None, None] + branch.mean(dim=(2, 3))[:, :, None, None])
        else:
            h, c = reference_cell(stage.cell, branch.mean(dim=(2, 3)), h, c)
            x = torch.relu(branch * h[:, :, None, None] + shortcut)
        gates.append(h)
        cells.append(c)
    return x, torch.stack(gates, dim=1), torch.stack(cells, dim=1)


def make_stage(dtype=torch.float32) -> DIAStage:
    """A downsampling stage 8 -> 16 channels, two blocks, in eval mode."""
    torch.manual_seed(0)
    stage = DIAStage([BasicBlock(8, C, stride=2), BasicBlock(C, C)], C).eval()
    return stage.to(dtype)


class ConstantCell(nn.Module):
    """Stands in for the cell to force every gate to one value."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, state=None):
        h = torch.full_like(x, self.value)
        return h, h


# ----------------------------------------------------------------------------- the cell


def test_create_attention_gives_the_cell_with_paper_reduction():
    cell = create_attention("dia", 32)
    assert isinstance(cell, DIALSTMCell)
    assert cell.hidden == 8  # r = 4
    assert [m.out_features for m in cell.w_ih if isinstance(m, nn.Linear)] == [8, 4 * 32]
    assert create_attention("dia", 32, reduction=8).hidden == 4


def test_cell_matches_equations_float64():
    torch.manual_seed(1)
    cell = DIALSTMCell(C).double()
    x, h, c = (torch.randn(3, C, dtype=torch.float64) for _ in range(3))
    h_new, c_new = cell(x, (h, c))
    h_ref, c_ref = reference_cell(cell, x, h, c)
    torch.testing.assert_close(h_new, h_ref)
    torch.testing.assert_close(c_new, c_ref)


def test_zero_state_is_made_like_the_input():
    torch.manual_seed(2)
    cell = DIALSTMCell(C).double()
    x = torch.randn(2, C, dtype=torch.float64)
    h, c = cell(x)  # a torch.zeros(...) state (the blog post's) would be float32 here and fail
    assert h.dtype == c.dtype == torch.float64
    zeros = torch.zeros(2, C, dtype=torch.float64)
    torch.testing.assert_close((h, c), reference_cell(cell, x, zeros, zeros))


def test_zero_state_follows_the_device():
    # A CPU torch.zeros state mixed with tensors on another device raises; "meta" stands in for
    # a GPU on a machine without one.
    stage = make_stage().to("meta")
    y, attention = stage(torch.randn(2, 8, 8, 8, device="meta"), return_attention=True)
    assert y.device.type == "meta" and attention["gates"].device.type == "meta"


def test_hidden_state_is_a_gate_in_unit_interval():
    torch.manual_seed(3)
    cell = DIALSTMCell(C)
    x, h, c = (3 * torch.randn(64, C) for _ in range(3))
    h_new, c_new = cell(x, (h, c))
    # c takes negative values, where an LSTM's o * tanh(c) output would be negative.
    assert (c_new < 0).any()
    assert ((h_new > 0) & (h_new < 1)).all()


def test_state_carries_between_calls():
    torch.manual_seed(4)
    cell = DIALSTMCell(C).double()
    x1, x2 = torch.randn(2, C, dtype=torch.float64), torch.randn(2, C, dtype=torch.float64)
    h1, c1 = cell(x1)
    h2, c2 = cell(x2, (h1, c1))
    zeros = torch.zeros(2, C, dtype=torch.float64)
    h1_ref, c1_ref = reference_cell(cell, x1, zeros, zeros)
    torch.testing.assert_close((h2, c2), reference_cell(cell, x2, h1_ref, c1_ref))
    assert not torch.allclose(h2, cell(x2)[0])  # the state changes the result


def test_cell_pools_a_feature_map():
    torch.manual_seed(5)
    cell = DIALSTMCell(C)
    fmap = torch.randn(2, C, 5, 7)
    expected = cell(fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(cell(fmap), expected)
    torch.testing.assert_close(cell(fmap.to(memory_format=torch.channels_last)), expected)


def test_cell_attention_dict():
    torch.manual_seed(6)
    cell = DIALSTMCell(C)
    (h, c), attention = cell(torch.randn(2, C), return_attention=True)
    assert set(attention) == {"attention", "input_gate", "forget_gate", "output_gate", "candidate"}
    assert all(t.shape == (2, C) for t in attention.values())
    torch.testing.assert_close(attention["attention"], h)
    torch.testing.assert_close(attention["output_gate"] * torch.sigmoid(c), h)
    torch.testing.assert_close(attention["input_gate"] * attention["candidate"], c)  # c_0 = 0


def test_cell_gradcheck():
    torch.manual_seed(7)
    cell = DIALSTMCell(8).double()
    inputs = [torch.randn(2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c)), inputs)


def test_cell_bf16_autocast_close_to_float32():
    torch.manual_seed(8)
    cell = DIALSTMCell(C)
    x = torch.randn(4, C)
    h32, _ = cell(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, c16 = cell(x)
    assert torch.isfinite(h16).all() and torch.isfinite(c16).all()
    torch.testing.assert_close(h16.float(), h32, atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------- the stage


def test_stage_matches_manual_loop_float64():
    stage = make_stage(torch.float64)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    y, attention = stage(x, return_attention=True)
    y_ref, gates_ref, cells_ref = reference_stage(stage, x)
    assert y.shape == (2, C, 4, 4) and attention["gates"].shape == attention["cells"].shape == (2, 2, C)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(attention["gates"], gates_ref)
    torch.testing.assert_close(attention["cells"], cells_ref)
    assert not torch.allclose(gates_ref[:, 0], gates_ref[:, 1])  # each block gets its own gate


def test_official_basic_variant_matches_manual_loop_float64():
    stage = make_stage(torch.float64)
    official = DIAStage(stage.blocks, C, variant="official_basic").double().eval()
    official.cell.load_state_dict(stage.cell.state_dict())
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    y, attention = official(x, return_attention=True)
    y_ref, gates_ref, cells_ref = reference_stage(official, x, official_basic=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(attention["gates"], gates_ref)
    torch.testing.assert_close(attention["cells"], cells_ref)
    assert not torch.allclose(y, stage(x))  # a different function with the same weights
    assert "official_basic" in repr(official) and "variant" not in repr(stage).split("\n")[0]


def test_official_basic_variant_with_gate_zero_keeps_only_the_pooled_branch():
    # Every gate 0: the branch form keeps the shortcut; the official BasicBlock form keeps only
    # the per-channel mean of the last branch, a constant over the feature map.
    stage = DIAStage(make_stage(torch.float64).blocks, C, variant="official_basic").double().eval()
    stage.cell = ConstantCell(0.0)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    y = stage(x)
    x1 = torch.relu(stage.blocks[0].forward_parts(x)[0].mean(dim=(2, 3), keepdim=True)).expand(-1, -1, 4, 4)
    branch, _ = stage.blocks[1].forward_parts(x1)
    torch.testing.assert_close(y, torch.relu(branch.mean(dim=(2, 3), keepdim=True)).expand_as(y))
    assert (y.std(dim=(2, 3)) == 0).all()  # no spatial information is left


def test_stage_rejects_unknown_variant():
    with pytest.raises(ValueError, match=r"expected variant to be one of 'branch', 'official_basic', got 'after'"):
        DIAStage([BasicBlock(8, C)], C, variant="after")


def test_collect_dia_returns_every_stage_and_restores_the_model():
    torch.manual_seed(10)
    model = resnet18(num_classes=10, attention="dia", width=8).train()
    x = torch.randn(3, 3, 16, 16)
    found = collect_dia(model, x)
    assert list(found) == ["layer1", "layer2", "layer3", "layer4"]
    for k, name in enumerate(found):
        assert found[name]["gates"].shape == found[name]["cells"].shape == (3, 2, 8 * 2**k)
    assert model.training and "forward" not in vars(model.layer1)
    model.eval()
    _, direct = model.layer1(model.stem(x), return_attention=True)
    torch.testing.assert_close(found["layer1"]["gates"], direct["gates"])
    with pytest.raises(ValueError, match="expected a model with DIAStage modules"):
        collect_dia(resnet18(num_classes=10, width=8), x)


def test_stage_with_gate_one_is_the_plain_stage():
    stage = make_stage(torch.float64)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    stage.cell = ConstantCell(1.0)
    torch.testing.assert_close(stage(x), nn.Sequential(*stage.blocks)(x))


def test_stage_gates_the_branch_before_the_addition():
    # With every gate at 0 only the shortcut path is left: gating after the addition (the
    # official BasicBlock variant) would give zeros instead.
    stage = make_stage(torch.float64)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    stage.cell = ConstantCell(0.0)
    expected = torch.relu(stage.blocks[0].shortcut(x))  # block 1's shortcut is the identity
    assert expected.abs().sum() > 0
    torch.testing.assert_close(stage(x), expected)


def test_stage_state_is_fresh_per_forward_and_per_sample():
    stage = make_stage()
    x = torch.randn(3, 8, 8, 8)
    first = stage(x)
    torch.testing.assert_close(stage(x), first)  # no state left over from the last call
    torch.testing.assert_close(stage(x[1:2]), first[1:2])  # batch 1 in eval; no mixing of samples


def test_stage_channels_last_matches_contiguous():
    stage = make_stage()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(stage(x.to(memory_format=torch.channels_last)), stage(x))


def test_stage_bf16_autocast_close_to_float32():
    stage = make_stage()
    x = torch.randn(2, 8, 8, 8)
    y32 = stage(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, attention = stage(x, return_attention=True)
    assert torch.isfinite(y16).all() and torch.isfinite(attention["gates"]).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()


# ----------------------------------------------------------------------------- in ResNet-18


def cell_parameters(channels: int, reduction: int = 4) -> int:
    """Two bottlenecks C -> C/r -> 4C, with biases."""
    hidden = channels // reduction
    return 2 * (channels * hidden + hidden + hidden * 4 * channels + 4 * channels)


def test_resnet18_has_one_cell_per_stage():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    model = resnet18(num_classes=100, attention="dia")
    extra = count(model) - count(resnet18(num_classes=100))
    cells = [m for m in model.modules() if isinstance(m, DIALSTMCell)]
    assert len(cells) == 4  # not one per block (8)
    assert extra == sum(cell_parameters(c) for c in (64, 128, 256, 512)) == 878_560
    assert abs(extra - 879_000) < 1_000  # MECHANISMS.md: about +879k


def test_resnet18_dia_forward_backward_reaches_every_cell_parameter():
    torch.manual_seed(9)
    model = resnet18(num_classes=10, attention="dia")
    logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".cell." in name:
            assert p.grad.abs().sum() > 0, name


def test_resnet18_dia_float64_and_reduction_option():
    model = resnet18(num_classes=10, attention="dia", reduction=8).double().eval()
    assert model.layer1.cell.hidden == 64 // 8
    out = model(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- bad input


def test_cell_rejects_bad_input():
    cell = DIALSTMCell(C)
    with pytest.raises(ValueError, match=r"expected 16 channels \(dim 1\), got 8"):
        cell(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"expected a 2-D or \[B, C, H, W\] tensor, got shape \[2, 16, 4\]"):
        cell(torch.randn(2, C, 4))
    with pytest.raises(ValueError, match="expected a floating-point tensor, got torch.int64"):
        cell(torch.ones(2, C, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected state \(h, c\) or None, got Tensor"):
        cell(torch.randn(2, C), torch.zeros(2, C))
    with pytest.raises(ValueError, match=r"expected state \(h, c\) or None, got tuple of length 3"):
        cell(torch.randn(2, C), (torch.zeros(2, C),) * 3)
    with pytest.raises(ValueError, match=r"expected state h of shape \[2, 16\], got \[2, 8\]"):
        cell(torch.randn(2, C), (torch.zeros(2, 8), torch.zeros(2, C)))
    with pytest.raises(ValueError, match=r"expected state c of shape \[2, 16\], got \[3, 16\]"):
        cell(torch.randn(2, C), (torch.zeros(2, C), torch.zeros(3, C)))


def test_cell_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction 32 leaves 16 // 32 = 0 hidden channels"):
        DIALSTMCell(16, reduction=32)
    with pytest.raises(ValueError, match="expected channels to be a positive integer, got 0"):
        DIALSTMCell(0)


def test_stage_rejects_bad_input():
    with pytest.raises(ValueError, match="expected at least one block, got none"):
        DIAStage([], C)
    with pytest.raises(ValueError, match=r"forward_parts.*got Conv2d at position 0"):
        DIAStage([nn.Conv2d(C, C, 3)], C)
    with pytest.raises(ValueError, match="expected in_channels.*got Block without one"):
        class Block(nn.Module):
            def forward_parts(self, x):
                return x, x
        DIAStage([Block()], C)
    stage = make_stage()
    with pytest.raises(ValueError, match=r"expected 8 channels \(dim 1\), got 16"):
        stage(torch.randn(2, C, 8, 8))
    with pytest.raises(ValueError, match=r"expected a \[B, C, H, W\] tensor, got shape \[2, 8, 8\]"):
        stage(torch.randn(2, 8, 8))
    too_wide = DIAStage([BasicBlock(8, C)], 2 * C)  # branch width 16, cell width 32
    with pytest.raises(ValueError, match=r"BasicBlock branch\): expected 32 channels \(dim 1\), got 16"):
        too_wide(torch.randn(2, 8, 4, 4))
