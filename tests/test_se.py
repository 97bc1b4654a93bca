"""Squeeze-and-Excitation (attn_lib.modules.se): equations, invariants, seed pitfalls."""
import math

import pytest
import torch

from attn_lib.modules.se import SqueezeExcitation


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def naive_se(x: torch.Tensor, se: SqueezeExcitation) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2-4 of Hu et al. with explicit loops over Python floats (float64), using ``se``'s
    own weights; returns ``(y, s)``."""
    W1, W2 = se.fc1.weight.tolist(), se.fc2.weight.tolist()
    hidden, C = len(W1), len(W2)
    b1 = se.fc1.bias.tolist() if se.fc1.bias is not None else [0.0] * hidden
    b2 = se.fc2.bias.tolist() if se.fc2.bias is not None else [0.0] * C
    B, _, H, W = x.shape
    pixels = x.double().tolist()
    s_all = torch.empty(B, C, 1, 1, dtype=torch.float64)
    for n in range(B):
        z = [sum(pixels[n][c][i][j] for i in range(H) for j in range(W)) / (H * W)
             for c in range(C)]
        h = [max(sum(W1[k][c] * z[c] for c in range(C)) + b1[k], 0.0) for k in range(hidden)]
        for c in range(C):
            logit = sum(W2[c][k] * h[k] for k in range(hidden)) + b2[c]
            s_all[n, c, 0, 0] = 1.0 / (1.0 + math.exp(-logit))
    return x.double() * s_all, s_all


@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_reference(bias):
    se = SqueezeExcitation(8, reduction=2, bias=bias).double()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    y, s = se(x, return_attention=True)
    y_ref, s_ref = naive_se(x, se)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(y, y_ref)


def test_attention_is_the_gate_actually_applied():
    se = SqueezeExcitation(32)
    x = torch.randn(3, 32, 5, 5)
    y, s = se(x, return_attention=True)
    assert s.shape == (3, 32, 1, 1)
    assert torch.equal(y, x * s)
    assert ((s > 0) & (s < 1)).all()
    assert torch.equal(se(x), y)


def test_output_is_the_gated_input_not_the_gate():
    # Seed pitfall (and the ECA seed's bug): returning s instead of x * s. With W2 = 0 and
    # b2 = log 3 every gate is sigmoid(log 3) = 3/4, so the output must be exactly 0.75 * x.
    se = SqueezeExcitation(16, reduction=4).double()
    with torch.no_grad():
        se.fc2.weight.zero_()
        se.fc2.bias.fill_(math.log(3.0))
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    y, s = se(x, return_attention=True)
    torch.testing.assert_close(s, torch.full_like(s, 0.75))
    torch.testing.assert_close(y, 0.75 * x)


def test_reduction_that_leaves_no_hidden_unit_raises():
    # Seed pitfall: `C // 16` with no floor builds a 0-unit layer for C < 16 and runs silently.
    with pytest.raises(ValueError, match=r"0 hidden channels.*expected reduction <= 8"):
        SqueezeExcitation(8)
    with pytest.raises(ValueError, match="0 hidden"):
        SqueezeExcitation(15, reduction=16)
    assert SqueezeExcitation(16).hidden == 1
    assert SqueezeExcitation(8, reduction=8).hidden == 1


@pytest.mark.parametrize("bias, expected", [(True, 2 * 512 * 32 + 32 + 512), (False, 2 * 512 * 32)])
def test_parameter_count_is_the_papers(bias, expected):
    # 2 C^2 / r weights (+ C + C/r biases); 512 channels, r = 16.
    se = SqueezeExcitation(512, bias=bias)
    assert se.hidden == 32
    assert sum(p.numel() for p in se.parameters()) == expected
    assert (se.fc1.bias is None) == (not bias) and (se.fc2.bias is None) == (not bias)


def test_equivariant_to_pixel_permutations():
    # The squeeze is a mean over pixels, so shuffling pixels only shuffles the output.
    se = SqueezeExcitation(16, reduction=4).double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    perm = torch.randperm(15)
    shuffle = lambda t: t.flatten(2)[:, :, perm].view_as(t)  # noqa: E731
    torch.testing.assert_close(se(shuffle(x)), shuffle(se(x)))


def test_gradients_reach_every_parameter_and_the_input():
    se = SqueezeExcitation(16, reduction=4)
    x = torch.randn(4, 16, 3, 3, requires_grad=True)
    se(x).square().sum().backward()
    for name, p in se.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_gradcheck_float64():
    se = SqueezeExcitation(4, reduction=2).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: se(t), (x,))


def test_bf16_autocast_is_finite_and_close_to_float32():
    se = SqueezeExcitation(32)
    x = torch.randn(2, 32, 4, 4)
    y32, s32 = se(x, return_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = se(x, return_attention=True)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(s16.float(), s32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=2e-2)


def test_channels_last_matches_contiguous():
    se = SqueezeExcitation(32)
    x = torch.randn(2, 32, 5, 4)
    torch.testing.assert_close(se(x.to(memory_format=torch.channels_last)), se(x))


def test_batch_of_one_in_eval_mode_and_float64():
    se = SqueezeExcitation(32).eval()
    x = torch.randn(1, 32, 1, 1)
    y, s = se(x, return_attention=True)
    assert y.shape == (1, 32, 1, 1) and s.shape == (1, 32, 1, 1)
    assert se.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 31, 4, 4), r"expected 32 channels.*got 31"),
        (torch.randn(2, 32, 4), r"expected a \[B, C, H, W\] tensor, got shape \[2, 32, 4\]"),
        (torch.ones(2, 32, 4, 4, dtype=torch.long), r"expected a floating-point tensor, got .*int64"),
        ([[1.0]], r"expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_raises_value_error_naming_expected_and_received(x, match):
    with pytest.raises(ValueError, match=match):
        SqueezeExcitation(32)(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=0), r"expected channels to be a positive integer, got 0"),
        (dict(channels=32.0), r"expected channels to be a positive integer, got 32.0"),
        (dict(channels=32, reduction=0), r"expected a positive reduction ratio, got 0"),
        (dict(channels=32, reduction=-4), r"expected a positive reduction ratio, got -4"),
        (dict(channels=32, reduction=True), r"expected a positive reduction ratio, got True"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SqueezeExcitation(**kwargs)


def test_matches_timm_semodule_with_the_same_weights():
    timm_layers = pytest.importorskip("timm.layers")
    se = SqueezeExcitation(64, reduction=16, bias=True)
    # timm rounds the hidden width with make_divisible (to 8 here); give it ours explicitly.
    ref = timm_layers.SEModule(64, rd_channels=se.hidden, bias=True)
    with torch.no_grad():
        ref.fc1.weight.copy_(se.fc1.weight[:, :, None, None])
        ref.fc1.bias.copy_(se.fc1.bias)
        ref.fc2.weight.copy_(se.fc2.weight[:, :, None, None])
        ref.fc2.bias.copy_(se.fc2.bias)
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(se(x), ref(x))
