"""Efficient Channel Attention (attn_lib.modules.eca): kernel-size rule, equations, pitfalls."""
import math

import pytest
import torch

from attn_lib.modules.eca import EfficientChannelAttention, eca_kernel_size


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def naive_eca(x: torch.Tensor, eca: EfficientChannelAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """GAP, a 1-D convolution across channels with zero padding, sigmoid; explicit loops over
    Python floats (float64), with ``eca``'s own kernel; returns ``(y, omega)``."""
    w = eca.conv.weight.flatten().tolist()
    k = len(w)
    B, C, H, W = x.shape
    pixels = x.double().tolist()
    omega = torch.empty(B, C, 1, 1, dtype=torch.float64)
    for n in range(B):
        y = [sum(pixels[n][c][i][j] for i in range(H) for j in range(W)) / (H * W)
             for c in range(C)]
        for c in range(C):
            acc = 0.0
            for j in range(k):
                neighbour = c + j - k // 2
                if 0 <= neighbour < C:  # zero padding outside the channel axis
                    acc += w[j] * y[neighbour]
            omega[n, c, 0, 0] = 1.0 / (1.0 + math.exp(-acc))
    return x.double() * omega, omega


def test_adaptive_kernel_size_gives_the_papers_values():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512)] == [3, 5, 5, 5]
    assert [EfficientChannelAttention(c).kernel_size for c in (64, 128, 256, 512)] == [3, 5, 5, 5]
    assert EfficientChannelAttention(512).conv.kernel_size == (5,)


@pytest.mark.parametrize("gamma, b", [(2, 1), (3, 2), (1.5, 0.5)])
def test_kernel_size_is_the_nearest_odd_number_ties_going_up(gamma, b):
    for channels in list(range(1, 300)) + [511, 512, 1024, 2048, 4096]:
        t = abs(math.log2(channels) / gamma + b / gamma)
        # Brute force: the odd numbers around t, nearest first, the larger one on a tie.
        candidates = range(1, int(t) + 4, 2)
        nearest = min(candidates, key=lambda odd: (abs(odd - t), -odd))
        assert eca_kernel_size(channels, gamma, b) == nearest, (channels, t)


def test_kernel_size_agrees_with_timm_where_timm_does_not_clamp():
    timm_layers = pytest.importorskip("timm.layers")
    for channels in (8, 16, 24, 64, 100, 128, 256, 512, 1000, 2048):
        timm_k = timm_layers.EcaModule(channels).conv.kernel_size[0]
        assert EfficientChannelAttention(channels).kernel_size == timm_k, channels
    # Below 8 channels the formula gives k = 1; timm raises it to 3, we keep the paper's rule.
    assert eca_kernel_size(4) == 1


def test_fixed_kernel_size_reproduces_the_official_default():
    # The official code never computes k: eca_layer defaults to k_size=3 for every layer.
    official = EfficientChannelAttention(512, kernel_size=3)
    adaptive = EfficientChannelAttention(512)
    assert official.kernel_size == 3 and adaptive.kernel_size == 5
    assert sum(p.numel() for p in official.parameters()) == 3
    assert sum(p.numel() for p in adaptive.parameters()) == 5
    assert adaptive.conv.bias is None


@pytest.mark.parametrize("kernel_size, match", [
    (0, "expected kernel_size to be a positive integer, got 0"),
    (-3, "expected kernel_size to be a positive integer, got -3"),
    (3.0, "expected kernel_size to be a positive integer, got 3.0"),
    (True, "expected kernel_size to be a positive integer, got True"),
    (4, "expected an odd kernel_size, got 4"),
])
def test_invalid_fixed_kernel_size_raises(kernel_size, match):
    with pytest.raises(ValueError, match=match):
        EfficientChannelAttention(64, kernel_size=kernel_size)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=0), "expected channels to be a positive integer, got 0"),
    (dict(channels=64, gamma=0), "expected gamma to be a positive number, got 0"),
    (dict(channels=64, gamma=-2), "expected gamma to be a positive number, got -2"),
    (dict(channels=64, b=float("nan")), "expected b to be a finite number, got nan"),
])
def test_invalid_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EfficientChannelAttention(**kwargs)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_matches_naive_reference(kernel_size):
    eca = EfficientChannelAttention(7, kernel_size=kernel_size).double()
    x = torch.randn(2, 7, 3, 2, dtype=torch.float64)
    y, omega = eca(x, return_attention=True)
    y_ref, omega_ref = naive_eca(x, eca)
    torch.testing.assert_close(omega, omega_ref)
    torch.testing.assert_close(y, y_ref)


def test_attention_is_the_gate_actually_applied():
    eca = EfficientChannelAttention(64)
    x = torch.randn(3, 64, 4, 4)
    y, omega = eca(x, return_attention=True)
    assert omega.shape == (3, 64, 1, 1)
    assert torch.equal(y, x * omega)
    assert ((omega > 0) & (omega < 1)).all()
    assert torch.equal(eca(x), y)


def test_output_is_the_gated_input_not_the_weights():
    # Seed pitfall: the seed's ECA returns the weights (`return y  # x * y.expand_as(x)`).
    # With a zero kernel every weight is sigmoid(0) = 1/2, so the output must be x / 2.
    eca = EfficientChannelAttention(16).double()
    with torch.no_grad():
        eca.conv.weight.zero_()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    y, omega = eca(x, return_attention=True)
    torch.testing.assert_close(omega, torch.full_like(omega, 0.5))
    torch.testing.assert_close(y, 0.5 * x)
    assert y.shape == x.shape


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_cross_channel_interaction_is_local(kernel_size):
    # Each gate depends on its own channel and k // 2 neighbours on either side, nothing else:
    # the Jacobian of the gates with respect to the pooled descriptor is a band matrix.
    channels = 9
    eca = EfficientChannelAttention(channels, kernel_size=kernel_size).double()
    with torch.no_grad():
        eca.conv.weight.copy_(torch.arange(1.0, kernel_size + 1).view(1, 1, -1))
    z = torch.randn(1, channels, 1, 1, dtype=torch.float64)  # a 1x1 map: its GAP is itself
    jac = torch.autograd.functional.jacobian(lambda t: eca(t, return_attention=True)[1], z)
    jac = jac.reshape(channels, channels)
    c, j = torch.meshgrid(torch.arange(channels), torch.arange(channels), indexing="ij")
    band = (c - j).abs() <= kernel_size // 2
    assert (jac[~band] == 0).all()
    assert (jac[band] != 0).all()


def test_equivariant_to_pixel_permutations():
    eca = EfficientChannelAttention(16).double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    perm = torch.randperm(15)
    shuffle = lambda t: t.flatten(2)[:, :, perm].view_as(t)  # noqa: E731
    torch.testing.assert_close(eca(shuffle(x)), shuffle(eca(x)))


def test_gradients_reach_the_kernel_and_the_input():
    eca = EfficientChannelAttention(16, kernel_size=3)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    eca(x).square().sum().backward()
    assert eca.conv.weight.grad is not None and (eca.conv.weight.grad != 0).all()
    assert x.grad.abs().sum() > 0


def test_gradcheck_float64():
    eca = EfficientChannelAttention(6, kernel_size=3).double()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: eca(t), (x,))


def test_bf16_autocast_is_finite_and_close_to_float32():
    eca = EfficientChannelAttention(64)
    x = torch.randn(2, 64, 4, 4)
    y32, w32 = eca(x, return_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, w16 = eca(x, return_attention=True)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(w16.float(), w32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=2e-2)


def test_channels_last_matches_contiguous():
    eca = EfficientChannelAttention(64)
    x = torch.randn(2, 64, 5, 4)
    torch.testing.assert_close(eca(x.to(memory_format=torch.channels_last)), eca(x))


def test_batch_of_one_in_eval_mode_and_float64():
    eca = EfficientChannelAttention(64).eval()
    y, w = eca(torch.randn(1, 64, 1, 1), return_attention=True)
    assert y.shape == (1, 64, 1, 1) and w.shape == (1, 64, 1, 1)
    assert eca.double()(torch.randn(1, 64, 2, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("x, match", [
    (torch.randn(2, 63, 4, 4), r"expected 64 channels.*got 63"),
    (torch.randn(2, 64), r"expected a \[B, C, H, W\] tensor, got shape \[2, 64\]"),
    (torch.ones(2, 64, 4, 4, dtype=torch.int32), r"expected a floating-point tensor, got .*int32"),
    (None, r"expected a torch.Tensor, got NoneType"),
])
def test_bad_input_raises_value_error_naming_expected_and_received(x, match):
    with pytest.raises(ValueError, match=match):
        EfficientChannelAttention(64)(x)


def test_matches_timm_ecamodule_with_the_same_kernel():
    timm_layers = pytest.importorskip("timm.layers")
    eca = EfficientChannelAttention(128)
    ref = timm_layers.EcaModule(channels=128)
    with torch.no_grad():
        ref.conv.weight.copy_(eca.conv.weight)
    x = torch.randn(2, 128, 4, 4)
    torch.testing.assert_close(eca(x), ref(x))
