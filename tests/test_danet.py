"""DANet (Fu et al., CVPR 2019): position, channel and dual attention, and the DANet head.

The references below are written from the paper's equations with explicit loops over positions
and channels, in float64, and use the modules' own weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attn_lib
from attn_lib.modules import danet
from attn_lib.modules.danet import ChannelAttention, DANetHead, DualAttention, PositionAttention


def feature_map(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def set_scales(module: torch.nn.Module, alpha: float = 0.7, beta: float = 0.3) -> torch.nn.Module:
    """Make the zero-initialised scales non-zero, so the attention terms show in the output."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("alpha"):
                parameter.fill_(alpha)
            elif name.endswith("beta"):
                parameter.fill_(beta)
    return module


def permute_pixels(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)[:, :, perm].reshape(x.shape)


# --- naive references, straight from the paper -------------------------------------------------

def naive_position(module: PositionAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1)-(2): s_ji = exp(B_i . C_j) / sum_i exp(B_i . C_j); E_j = alpha sum_i s_ji D_i + A_j.

    Position j is the one being updated (seen through C, the module's ``query``), positions i are
    read (seen through B, the module's ``key``), D is ``value``."""
    batch, channels, height, width = x.shape
    n = height * width
    w_c, b_c = module.query.weight[:, :, 0, 0].double(), module.query.bias.double()
    w_b, b_b = module.key.weight[:, :, 0, 0].double(), module.key.bias.double()
    w_d, b_d = module.value.weight[:, :, 0, 0].double(), module.value.bias.double()
    alpha = module.alpha.double()
    out = torch.empty(batch, channels, n, dtype=torch.float64)
    s = torch.empty(batch, n, n, dtype=torch.float64)
    for b in range(batch):
        a = x[b].reshape(channels, n).double()
        proj_c, proj_b, proj_d = w_c @ a + b_c[:, None], w_b @ a + b_b[:, None], w_d @ a + b_d[:, None]
        for j in range(n):
            weights = torch.stack([torch.exp(proj_b[:, i] @ proj_c[:, j]) for i in range(n)])
            s[b, j] = weights / weights.sum()
            out[b, :, j] = alpha * sum(s[b, j, i] * proj_d[:, i] for i in range(n)) + a[:, j]
    return out.reshape(x.shape), s


def naive_channel(module: ChannelAttention, x: torch.Tensor, official: bool = False):
    """Eq. (3)-(4): x_ji = exp(A_i . A_j) / sum_i exp(A_i . A_j); E_j = beta sum_i x_ji A_i + A_j.
    ``official``: the exponent is max_i'(A_i' . A_j) - A_i . A_j instead."""
    batch, channels = x.shape[:2]
    beta = module.beta.double()
    out = torch.empty(batch, channels, x[0, 0].numel(), dtype=torch.float64)
    attention = torch.empty(batch, channels, channels, dtype=torch.float64)
    for b in range(batch):
        a = x[b].reshape(channels, -1).double()
        for j in range(channels):
            energy = torch.stack([a[i] @ a[j] for i in range(channels)])
            if official:
                energy = energy.max() - energy
            attention[b, j] = torch.exp(energy) / torch.exp(energy).sum()
            out[b, j] = beta * sum(attention[b, j, i] * a[i] for i in range(channels)) + a[j]
    return out.reshape(x.shape), attention


# --- the position module -----------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["explicit", "fused"])
def test_position_matches_paper_equations(implementation):
    module = set_scales(PositionAttention(16, implementation=implementation).double())
    x = feature_map(2, 16, 2, 3)
    expected, expected_map = naive_position(module, x)
    assert_close(module(x), expected)
    y, attention = module(x, return_attention=True)
    assert attention.shape == (2, 6, 6)
    assert_close(y, expected)
    assert_close(attention, expected_map)


def test_position_attention_rows_are_softmaxes():
    module = set_scales(PositionAttention(16))
    _, attention = module(feature_map(3, 16, 3, 4, dtype=torch.float32), return_attention=True)
    assert attention.shape == (3, 12, 12)
    assert (attention > 0).all()
    assert_close(attention.sum(-1), torch.ones(3, 12))
    # softmax over keys (dim -1), not over queries: columns need not sum to 1
    assert not torch.allclose(attention.sum(-2), torch.ones(3, 12), atol=1e-3)


@pytest.mark.parametrize("dtype, tolerance",
                         [(torch.float64, {}), (torch.float32, {"atol": 1e-5, "rtol": 1e-5})])
def test_fused_equals_explicit(dtype, tolerance):
    explicit = set_scales(PositionAttention(32, implementation="explicit")).to(dtype)
    fused = PositionAttention(32, implementation="fused").to(dtype)
    fused.load_state_dict(explicit.state_dict())
    x = feature_map(2, 32, 5, 4, dtype=dtype, seed=1).requires_grad_()
    y_explicit, y_fused = explicit(x), fused(x)
    assert_close(y_fused, y_explicit, **tolerance)
    grad_explicit = torch.autograd.grad(y_explicit.square().sum(), [x, *explicit.parameters()])
    grad_fused = torch.autograd.grad(y_fused.square().sum(), [x, *fused.parameters()])
    for g_fused, g_explicit in zip(grad_fused, grad_explicit):
        assert_close(g_fused, g_explicit, **tolerance)


@pytest.mark.parametrize("channels, reduction, batch, height, width", [
    (16, 8, 1, 1, 1),     # one position
    (16, 8, 2, 7, 5),     # odd map
    (24, 8, 3, 3, 11),    # 8 heads of width 3
    (17, 8, 2, 4, 3),     # width 2 does not divide 17: the value is padded to 9 heads
    (12, 1.5, 2, 2, 9),   # width 8, 1.5 heads: padded to 2
    (8, 0.5, 1, 3, 3),    # query/key wider than the value (16 > 8): one padded head
    (64, 8, 2, 9, 9),
])
def test_fused_equals_explicit_float64_shapes_and_gradients(channels, reduction, batch, height, width):
    explicit = set_scales(PositionAttention(channels, reduction, implementation="explicit")).double()
    fused = PositionAttention(channels, reduction, implementation="fused").double()
    fused.load_state_dict(explicit.state_dict())
    x = feature_map(batch, channels, height, width, seed=channels + height).requires_grad_()
    y_explicit, y_fused = explicit(x), fused(x)
    assert_close(y_fused, y_explicit, rtol=1e-12, atol=1e-12)
    weights = torch.randn(y_fused.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_explicit = torch.autograd.grad((y_explicit * weights).sum(), [x, *explicit.parameters()])
    grad_fused = torch.autograd.grad((y_fused * weights).sum(), [x, *fused.parameters()])
    for name, g_fused, g_explicit in zip(["x", *dict(fused.named_parameters())], grad_fused, grad_explicit):
        assert_close(g_fused, g_explicit, rtol=1e-10, atol=1e-10, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("width, channels, head_width", [
    (4, 16, None), (4, 16, 4), (4, 16, 6), (3, 16, 3), (5, 5, None), (8, 3, None),
    (32, 256, None), (32, 256, 32), (24, 300, None)])
def test_fused_position_attention_is_softmax_qk_v(width, channels, head_width):
    """Padded query/key, heads sharing them, or both: always softmax(Q K^T) V."""
    g = torch.Generator().manual_seed(width * channels)
    query, key = (torch.randn(2, 10, width, generator=g, dtype=torch.float64) for _ in range(2))
    value = torch.randn(2, 10, channels, generator=g, dtype=torch.float64)
    expected = torch.softmax(query @ key.transpose(1, 2), dim=-1) @ value
    assert_close(danet.fused_position_attention(query, key, value, head_width), expected)


def test_fused_position_attention_rejects_a_head_narrower_than_the_query():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="head_width >= the query width 8, got 4"):
        danet.fused_position_attention(q, q, torch.randn(1, 4, 16), head_width=4)


def test_fused_path_runs_a_fused_kernel_on_cpu():
    """Called with unequal widths, scaled_dot_product_attention falls back to its math path (no
    fused op is dispatched); the head view lets the CPU's fused kernel run."""
    from attn_lib.bench_modules import _fused_kernel

    module = PositionAttention(32, implementation="fused")
    x = feature_map(2, 32, 6, 6, dtype=torch.float32)
    kernel = _fused_kernel(module, x, torch.device("cpu"))
    assert kernel != "math" and "scaled_dot_product" in kernel
    q, v = torch.randn(1, 36, 4), torch.randn(1, 36, 32)
    direct = _fused_kernel(lambda _: F.scaled_dot_product_attention(q, q, v), x, torch.device("cpu"))
    assert direct == "math"  # the call the module used to make


def test_attention_kernels_names_the_fused_kernel_and_nothing_for_the_math_path():
    from attn_lib.bench_modules import attention_kernels

    q, v = torch.randn(1, 16, 4), torch.randn(1, 16, 32)
    assert attention_kernels(lambda: F.scaled_dot_product_attention(q, q, v)) == []
    padded = F.pad(q, (0, 28))
    assert attention_kernels(lambda: F.scaled_dot_product_attention(padded, padded, v)) == [
        "_scaled_dot_product_flash_attention_for_cpu"]


def test_parameter_names_unchanged():
    """Recorded weights (state dicts) must keep loading: the fused path adds no parameter."""
    for implementation in ("explicit", "fused"):
        names = list(PositionAttention(16, implementation=implementation).state_dict())
        assert names == ["alpha", "query.weight", "query.bias", "key.weight", "key.bias",
                         "value.weight", "value.bias"]


def test_fused_path_builds_no_n_by_n_map(monkeypatch):
    """The fused path must not build the N x N softmax unless the map is asked for."""
    module = set_scales(PositionAttention(16, implementation="fused"))
    x = feature_map(1, 16, 4, 4, dtype=torch.float32)

    def forbidden(energy):
        raise AssertionError(f"an explicit {list(energy.shape)} attention map was built")

    monkeypatch.setattr(danet, "_softmax_float32", forbidden)
    assert module(x).shape == x.shape
    with pytest.raises(AssertionError, match="explicit"):  # the patch does catch the explicit path
        module(x, return_attention=True)


def test_position_is_equivariant_to_pixel_permutations():
    module = set_scales(PositionAttention(16)).double()
    x = feature_map(2, 16, 3, 3)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    y, attention = module(x, return_attention=True)
    y_perm, attention_perm = module(permute_pixels(x, perm), return_attention=True)
    assert_close(y_perm, permute_pixels(y, perm))
    assert_close(attention_perm, attention[:, perm][:, :, perm])


# --- the channel module ------------------------------------------------------------------------

@pytest.mark.parametrize("cam", ["paper", "official"])
def test_channel_matches_paper_equations(cam):
    module = set_scales(ChannelAttention(6, cam=cam)).double()
    x = feature_map(2, 6, 2, 2, seed=2) * 0.5
    expected, expected_map = naive_channel(module, x, official=cam == "official")
    y, attention = module(x, return_attention=True)
    assert attention.shape == (2, 6, 6)
    assert_close(y, expected)
    assert_close(attention, expected_map)
    assert_close(attention.sum(-1), torch.ones(2, 6, dtype=torch.float64))


def test_official_cam_is_softmax_of_minus_energy_and_differs_from_paper():
    """The official code's max(energy) - energy is softmax(-energy): not a stability trick."""
    x = feature_map(2, 8, 3, 3, seed=4) * 0.5
    a = x.flatten(2)
    energy = a @ a.transpose(1, 2)
    _, official = ChannelAttention(8, cam="official").double()(x, return_attention=True)
    _, paper = ChannelAttention(8, cam="paper").double()(x, return_attention=True)
    assert_close(official, torch.softmax(-energy, dim=-1))
    assert_close(paper, torch.softmax(energy, dim=-1))
    assert (official - paper).abs().max() > 0.1
    # each channel attends most to its most similar channel (paper) / least similar one (official)
    assert torch.equal(paper.argmax(-1), energy.argmax(-1))
    assert torch.equal(official.argmax(-1), energy.argmin(-1))


def test_seed_cam_pitfall_is_not_the_default():
    """A widely reposted Zhihu post's code (and the official code) compute softmax(rowmax - energy); ours defaults to the
    paper's softmax(energy)."""
    module = set_scales(ChannelAttention(8)).double()
    x = feature_map(1, 8, 2, 2, seed=5)
    a = x.flatten(2)
    energy = a @ a.transpose(1, 2)
    seed_attention = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
    seed_output = x + module.beta * (seed_attention @ a).reshape(x.shape)
    assert module.cam == "paper"
    assert not torch.allclose(module(x), seed_output)


def test_channel_is_equivariant_to_pixel_permutations():
    module = set_scales(ChannelAttention(8)).double()
    x = feature_map(2, 8, 3, 3) * 0.5
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(6))
    y, attention = module(x, return_attention=True)
    y_perm, attention_perm = module(permute_pixels(x, perm), return_attention=True)
    assert_close(y_perm, permute_pixels(y, perm))
    assert_close(attention_perm, attention)  # A A^T does not see the order of the pixels


# --- the dual module ---------------------------------------------------------------------------

@pytest.mark.parametrize("module", [PositionAttention(16), ChannelAttention(16), DualAttention(16)],
                         ids=["position", "channel", "dual"])
def test_identity_at_initialisation(module):
    scales = [p for n, p in module.named_parameters() if n.endswith(("alpha", "beta"))]
    assert scales and all(torch.equal(p, torch.zeros(1)) for p in scales)
    x = feature_map(2, 16, 3, 3, dtype=torch.float32)
    assert torch.equal(module(x), x)


def test_dual_counts_the_identity_once():
    dual = set_scales(DualAttention(16)).double()
    position, channel = PositionAttention(16).double(), ChannelAttention(16).double()
    position.load_state_dict(dual.position.state_dict())
    channel.load_state_dict(dual.channel.state_dict())
    x = feature_map(2, 16, 3, 2) * 0.5
    # y = x + alpha * position term + beta * channel term  ==  PAM(x) + CAM(x) - x
    assert_close(dual(x), position(x) + channel(x) - x)
    y, attention = dual(x, return_attention=True)
    assert set(attention) == {"position", "channel"}
    assert attention["position"].shape == (2, 6, 6) and attention["channel"].shape == (2, 16, 16)
    assert_close(attention["position"], position(x, return_attention=True)[1])
    assert_close(attention["channel"], channel(x, return_attention=True)[1])


@pytest.mark.parametrize("mode, alone", [("position", PositionAttention), ("channel", ChannelAttention)])
def test_dual_single_mode_is_that_module(mode, alone):
    dual = set_scales(DualAttention(16, mode=mode)).double()
    single = alone(16).double()
    single.load_state_dict(getattr(dual, mode).state_dict())
    assert sum(p.numel() for p in dual.parameters()) == sum(p.numel() for p in single.parameters())
    x = feature_map(1, 16, 2, 3) * 0.5
    y, attention = dual(x, return_attention=True)
    assert set(attention) == {mode}
    assert_close(y, single(x))


def test_dual_is_equivariant_to_pixel_permutations():
    module = set_scales(DualAttention(16)).double()
    x = feature_map(2, 16, 2, 4) * 0.5
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    assert_close(module(permute_pixels(x, perm)), permute_pixels(module(x), perm))


def test_create_attention_danet_is_the_dual_module():
    module = attn_lib.create_attention("danet", 32, cam="official", implementation="explicit")
    assert isinstance(module, DualAttention) and module.mode == "both"
    assert module.channel.cam == "official" and module.position.implementation == "explicit"


def test_parameter_count_256_channels():
    """PAM: 2 * (256*32 + 32) + (256*256 + 256) + alpha = 82,241; CAM: beta = 1; total 82,242."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(PositionAttention(256)) == 82_241
    assert count(ChannelAttention(256)) == 1
    assert count(DualAttention(256)) == 82_242
    plain = attn_lib.models.resnet18(num_classes=100)
    with_danet = attn_lib.models.resnet18(num_classes=100, attention="danet")
    assert count(with_danet) - count(plain) == 82_242


# --- gradients, precision, layouts -------------------------------------------------------------

def test_gradients_reach_every_parameter():
    module = set_scales(DualAttention(16))
    module(feature_map(2, 16, 3, 3, dtype=torch.float32)).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def _gradcheck_with_parameters(module: torch.nn.Module, x: torch.Tensor) -> bool:
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]

    def function(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    # fast mode checks random projections of the Jacobian: same power to fail, a fraction of the time
    return torch.autograd.gradcheck(function, (x.requires_grad_(), *params), fast_mode=True)


@pytest.mark.parametrize("module", [
    PositionAttention(4, reduction=2, implementation="explicit"),
    PositionAttention(4, reduction=2, implementation="fused"),
    ChannelAttention(4, cam="paper"),
    ChannelAttention(4, cam="official"),
    DualAttention(4, reduction=2),
], ids=["pam-explicit", "pam-fused", "cam-paper", "cam-official", "dual"])
def test_gradcheck(module):
    module = set_scales(module).double()
    x = feature_map(1, module.channels, 2, 2, seed=8) * 0.5
    assert _gradcheck_with_parameters(module, x)


@pytest.mark.parametrize("implementation", ["explicit", "fused"])
def test_bf16_autocast_close_to_float32(implementation):
    module = set_scales(DualAttention(32, implementation=implementation))
    x = feature_map(2, 32, 4, 4, dtype=torch.float32, seed=9) * 0.5
    expected, expected_maps = module(x, return_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        _, maps = module(x, return_attention=True)
    assert torch.isfinite(y).all()
    assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)
    for key in ("position", "channel"):
        assert maps[key].dtype == torch.float32  # softmax statistics kept in float32
        assert_close(maps[key].sum(-1), torch.ones_like(maps[key][..., 0]), atol=1e-5, rtol=0)
        assert_close(maps[key], expected_maps[key], atol=5e-2, rtol=0)


def test_channel_gram_matrix_stays_float32_under_autocast():
    """Entries of A A^T near 256 are 2 apart in bf16; the softmax compares differences of about 1,
    so a bf16 Gram matrix would scramble the attention."""
    module = ChannelAttention(8)
    x = 1 + 0.05 * feature_map(1, 8, 16, 16, dtype=torch.float32, seed=10)
    _, expected = module(x, return_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, attention = module(x, return_attention=True)
    assert_close(attention, expected, atol=1e-4, rtol=1e-4)


def test_channels_last_matches_contiguous():
    x = feature_map(2, 16, 3, 5, dtype=torch.float32, seed=11)
    for module in (set_scales(DualAttention(16, implementation="fused")),
                   set_scales(DualAttention(16, implementation="explicit")),
                   set_scales(DANetHead(16, 3, reduction=1, position_reduction=2)).eval()):
        assert_close(module(x.to(memory_format=torch.channels_last)), module(x))


# --- input checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [PositionAttention, ChannelAttention, DualAttention])
def test_wrong_input_raises_value_error(factory):
    module = factory(16)
    name = factory.__name__
    with pytest.raises(ValueError, match=rf"{name}: expected 16 channels \(dim 1\), got 8"):
        module(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError,
                       match=rf"{name}: expected a \[B, C, H, W\] tensor, got shape \[16, 4, 4\]"):
        module(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match=rf"{name}: expected a floating-point tensor, got torch.int64"):
        module(torch.ones(1, 16, 4, 4, dtype=torch.long))


def test_reduction_leaving_zero_channels_raises():
    with pytest.raises(ValueError, match=r"PositionAttention: reduction 8 leaves 4 // 8 = 0 hidden channels; "
                                         r"expected reduction <= 4"):
        PositionAttention(4)
    with pytest.raises(ValueError, match=r"leaves 4 // 8 = 0 hidden channels"):
        DualAttention(4)
    assert DualAttention(4, mode="channel")(torch.randn(1, 4, 2, 2)).shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"DANetHead: reduction 4 leaves 2 // 4 = 0 hidden"):
        DANetHead(2, 3)
    with pytest.raises(ValueError, match=r"PositionAttention: reduction 8 leaves 4 // 8 = 0"):
        DANetHead(16, 3)  # 16 // 4 = 4 channels in the branches, 4 // 8 = 0 for query and key


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match=r"expected cam to be one of 'paper', 'official', got 'softmax'"):
        ChannelAttention(8, cam="softmax")
    with pytest.raises(ValueError, match=r"expected cam to be one of 'paper', 'official'"):
        DualAttention(16, cam="Paper")
    with pytest.raises(ValueError,
                       match=r"expected mode to be one of 'both', 'position', 'channel', got 'spatial'"):
        DualAttention(16, mode="spatial")
    with pytest.raises(ValueError,
                       match=r"expected implementation to be one of 'fused', 'explicit', got 'flash'"):
        PositionAttention(16, implementation="flash")
    with pytest.raises(ValueError, match=r"expected channels to be a positive integer, got 0"):
        ChannelAttention(0)
    with pytest.raises(ValueError, match=r"expected dropout to be a probability in \[0, 1\), got 1.5"):
        DANetHead(64, 3, dropout=1.5)
    with pytest.raises(ValueError, match=r"expected num_classes to be a positive integer, got 0"):
        DANetHead(64, 0)
    with pytest.raises(ValueError, match=r"DANetHead: expected 64 channels \(dim 1\), got 32"):
        DANetHead(64, 3)(torch.randn(1, 32, 4, 4))


# --- the DANet head ----------------------------------------------------------------------------

def _randomise_batch_norms(module: torch.nn.Module, seed: int = 12) -> None:
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def _conv_bn_relu_reference(block: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv, bn = block[0], block[1]
    y = F.conv2d(x, conv.weight, padding=1)
    shape = (-1, 1, 1)
    y = (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (y * bn.weight.view(shape) + bn.bias.view(shape)).clamp_min(0)


def _classifier_reference(block: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv = block[1]
    return torch.einsum("kc,bchw->bkhw", conv.weight[:, :, 0, 0], x) + conv.bias.view(-1, 1, 1)


def test_head_matches_the_papers_layout():
    """conv3x3-BN-ReLU -> module -> conv3x3-BN-ReLU per branch, summed, then a 1x1 classifier."""
    head = set_scales(DANetHead(32, 3, aux=True)).double().eval()
    _randomise_batch_norms(head)
    x = feature_map(2, 32, 3, 2, seed=13)
    position = _conv_bn_relu_reference(head.position_in, x)
    position = _conv_bn_relu_reference(head.position_out, naive_position(head.position, position)[0])
    channel = _conv_bn_relu_reference(head.channel_in, x)
    channel = _conv_bn_relu_reference(head.channel_out, naive_channel(head.channel, channel)[0])
    logits, position_logits, channel_logits = head(x)
    assert logits.shape == (2, 3, 3, 2)
    assert_close(logits, _classifier_reference(head.classifier, position + channel))
    assert_close(position_logits, _classifier_reference(head.position_classifier, position))
    assert_close(channel_logits, _classifier_reference(head.channel_classifier, channel))


def test_head_parameter_count_and_attention_shapes():
    in_channels, classes, width = 64, 5, 16
    branch = 2 * (9 * in_channels * width + 2 * width) + 2 * (9 * width * width + 2 * width)
    position = 2 * (width * 2 + 2) + (width * width + width) + 1
    classifier = width * classes + classes
    head = DANetHead(in_channels, classes)
    assert sum(p.numel() for p in head.parameters()) == branch + position + 1 + classifier
    assert sum(p.numel() for p in DANetHead(in_channels, classes, aux=True).parameters()) == (
        branch + position + 1 + 3 * classifier)
    logits, attention = head(feature_map(2, in_channels, 4, 3, dtype=torch.float32), return_attention=True)
    assert logits.shape == (2, classes, 4, 3)
    assert attention["position"].shape == (2, 12, 12) and attention["channel"].shape == (2, width, width)


def test_head_batch_one_eval_matches_batch():
    head = set_scales(DANetHead(32, 4)).eval()
    _randomise_batch_norms(head)
    x = feature_map(3, 32, 4, 4, dtype=torch.float32, seed=14)
    assert_close(head(x[:1]), head(x)[:1])
    head.train()(x).sum().backward()  # trains too; every parameter gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


# --- the position-attention benchmark ----------------------------------------------------------

def test_bench_danet_end_to_end_on_tiny_settings(monkeypatch):
    """`python -m attn_lib bench danet` on tiny settings: rows per size, the fused kernel named."""
    import functools
    import json

    import attn_lib.bench as bench
    import attn_lib.bench_modules as bm

    tiny = functools.partial(bm.bench_danet_position, sizes=(2, 4), batch=1, channels=16, rounds=1,
                             warmup=0, min_seconds=0.0)
    monkeypatch.setattr(bm, "bench_danet_position", tiny)
    threads = torch.get_num_threads()
    results = bench.run("danet", device="cpu", steps=1, seed=2, command="python -m attn_lib bench danet")
    assert torch.get_num_threads() == threads
    assert results["benchmark"] == "danet_position" and results["seed"] == 2
    assert results["device"] == "cpu" and "git_commit" in results and results["cpu_threads"] == 1
    assert [(r["module"], r["size"]) for r in results["rows"]] == [("danet_position", 2), ("danet_position", 4)]
    for r in results["rows"]:
        assert r["explicit_seconds"] > 0 and r["fused_seconds"] > 0 and "errors" not in r
        assert r["fused_kernel"] != "math"  # the fused path does reach a fused kernel
    json.dumps(results)
    with pytest.raises(ValueError, match="unknown settings"):
        bm.bench_danet_position(torch.device("cpu"), 1, 0, size=(4,))


def test_cli_offers_the_danet_benchmark():
    from attn_lib.cli import build_parser

    assert build_parser().parse_args(["bench", "danet", "--device", "cpu"]).what == "danet"
