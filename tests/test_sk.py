"""Tests of the Selective Kernel convolution (Li et al., CVPR 2019): the equations, the softmax
axis, the argument checks, the cost, and the pitfalls of circulating code."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from attn_lib import create_attention
from attn_lib.models import resnet18
from attn_lib.modules.sk import SelectiveKernel


def randomized(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> SelectiveKernel:
    """A module whose weights and BN statistics are all random, so that no step is an identity
    and the branch weights are far from uniform (the official init makes them ~1/M)."""
    torch.manual_seed(seed)
    module = SelectiveKernel(**kwargs).to(dtype)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
        # Moderate selection logits: branch weights spread over (0, 1) without saturating.
        module.select.weight.mul_(0.2)
        for bn in [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.weight.add_(1.0)
            bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.1)
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return module


# ---------------------------------------------------------------- naive reference, from the paper

def naive_grouped_conv3x3(x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int,
                          groups: int) -> torch.Tensor:
    """A grouped, dilated 3x3 convolution with padding = dilation, written as a sum over the nine
    kernel taps: out[b, o] = sum_{i,j} sum_{c in group(o)} w[o, c, i, j] x[b, c, s*y + d*i, s*x + d*j]."""
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    in_per_group, out_per_group = c_in // groups, c_out // groups
    padded = F.pad(x, (dilation,) * 4)
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    out = x.new_zeros(batch, c_out, out_h, out_w)
    for g in range(groups):
        x_g = padded[:, g * in_per_group:(g + 1) * in_per_group]
        w_g = weight[g * out_per_group:(g + 1) * out_per_group]
        for i in range(3):
            for j in range(3):
                patch = x_g[:, :, i * dilation: i * dilation + stride * (out_h - 1) + 1: stride,
                            j * dilation: j * dilation + stride * (out_w - 1) + 1: stride]
                out[:, g * out_per_group:(g + 1) * out_per_group] += torch.einsum(
                    "oc,bchw->bohw", w_g[:, :, i, j], patch)
    return out


def naive_bn(t: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode batch norm over dim 1 of a [B, C, ...] tensor."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (t - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def naive_sk(module: SelectiveKernel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split, fuse, select exactly as Eq. 1-6 of the paper, with the module's own weights."""
    m_branches, c = module.branches, module.out_channels
    features = []
    for m, branch in enumerate(module.split, start=1):  # branch m: 3x3 with dilation m
        u_m = naive_grouped_conv3x3(x, branch.conv.weight, module.stride, m, module.groups)
        features.append(torch.clamp(naive_bn(u_m, branch.bn), min=0))
    fused = sum(features)                                                  # U
    s = fused.sum(dim=(2, 3)) / (fused.shape[2] * fused.shape[3])          # [B, C]
    z = torch.einsum("dc,bc->bd", module.fuse.fc.weight[:, :, 0, 0], s)    # W s
    z = torch.clamp(naive_bn(z, module.fuse.bn), min=0)                    # delta(B(W s))
    a_matrices = module.select.weight[:, :, 0, 0].reshape(m_branches, c, module.hidden)
    logits = torch.einsum("mcd,bd->bmc", a_matrices, z)                    # A_m z
    exp = torch.exp(logits)
    weights = exp / exp.sum(dim=1, keepdim=True)                           # softmax over m
    output = sum(weights[:, m, :, None, None] * features[m] for m in range(m_branches))
    return output, weights[..., None, None]


@pytest.mark.parametrize("kwargs, size", [
    (dict(channels=8, groups=4), (2, 8, 6, 5)),
    (dict(channels=8, out_channels=12, stride=2, branches=3, groups=4, min_dim=5), (2, 8, 7, 6)),
    (dict(channels=6, branches=1, groups=1, reduction=2, min_dim=1), (3, 6, 4, 4)),
])
def test_matches_naive_reference_float64(kwargs, size):
    module = randomized(dtype=torch.float64, **kwargs).eval()
    x = torch.randn(*size, dtype=torch.float64)
    y, attention = module(x, return_attention=True)
    y_ref, attention_ref = naive_sk(module, x)
    assert y.dtype == torch.float64 and attention.dtype == torch.float64
    torch.testing.assert_close(attention, attention_ref)
    torch.testing.assert_close(y, y_ref)


# ---------------------------------------------------------------- structure and invariants

@pytest.mark.parametrize("out_channels, reduction, min_dim, expected", [
    (64, 16, 32, 32),     # SKNet: C/r = 4 is below L, so d = L
    (1024, 16, 32, 64),   # C/r above L
    (8, 16, 32, 32),      # C // r = 0 is fine here: the floor L keeps d >= 1
    (64, 16, 2, 4),
    (64, 8, 4, 8),
])
def test_hidden_width_is_max_of_c_over_r_and_l(out_channels, reduction, min_dim, expected):
    module = SelectiveKernel(8, out_channels=out_channels, groups=8, reduction=reduction,
                             min_dim=min_dim)
    assert module.hidden == expected
    assert module.fuse.fc.weight.shape == (expected, out_channels, 1, 1)
    assert module.select.weight.shape == (module.branches * out_channels, expected, 1, 1)


def test_branch_m_is_a_3x3_with_dilation_m_and_all_branches_align():
    module = SelectiveKernel(8, out_channels=16, stride=2, branches=3, groups=4)
    for m, branch in enumerate(module.split, start=1):
        conv = branch.conv
        assert (conv.kernel_size, conv.dilation, conv.padding) == ((3, 3), (m, m), (m, m))
        assert (conv.stride, conv.groups, conv.bias) == ((2, 2), 4, None)
    x = torch.randn(2, 8, 7, 6)
    shapes = {tuple(branch(x).shape) for branch in module.split}
    assert shapes == {(2, 16, 4, 3)}
    assert module(x).shape == (2, 16, 4, 3)


def test_attention_sums_to_one_over_branches_and_not_over_channels():
    module = randomized(channels=8, branches=3, groups=2).eval()
    _, attention = module(torch.randn(2, 8, 5, 5), return_attention=True)
    assert attention.shape == (2, 3, 8, 1, 1)
    assert bool((attention > 0).all() and (attention < 1).all())
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2, 8, 1, 1))
    over_channels = attention.sum(dim=2)
    assert (over_channels - 1).abs().max() > 0.1, "each branch's weights should not sum to 1 over channels"


def test_output_is_the_attention_weighted_sum_of_the_branches():
    module = randomized(channels=8, branches=2, groups=4).eval()
    x = torch.randn(2, 8, 5, 5)
    y, attention = module(x, return_attention=True)
    expected = attention[:, 0] * module.split[0](x) + attention[:, 1] * module.split[1](x)
    torch.testing.assert_close(y, expected)


def with_select_bias(module: SelectiveKernel, bias: torch.Tensor) -> SelectiveKernel:
    """The same unit with a bias ``[M, C]`` on the select layer ``A`` (branch-major)."""
    select = nn.Conv2d(module.hidden, module.branches * module.out_channels, 1, bias=True)
    with torch.no_grad():
        select.weight.copy_(module.select.weight)
        select.bias.copy_(bias.flatten())
    module.select = select
    return module


def test_a_per_branch_select_bias_is_not_cancelled_by_the_softmax():
    """A softmax over the branches ignores a shift shared by all branches (a bias b_c the same
    for every m) but not a bias that differs per branch: that one is a learned preference for a
    branch, and changes the output. (The unit has no bias on A, as in the paper and the
    authors' SKNet-50; the reason is not that a bias would be harmless.)"""
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    plain = randomized(channels=8, branches=2, groups=2).eval()
    with torch.no_grad():
        y, attention = plain(x, return_attention=True)
        shared = with_select_bias(randomized(channels=8, branches=2, groups=2).eval(),
                                  torch.linspace(-2, 2, 8).expand(2, 8))
        torch.testing.assert_close(shared(x), y)  # same shift for both branches: cancelled
        per_branch = torch.stack([torch.full((8,), 2.0), torch.full((8,), -2.0)])
        biased = with_select_bias(randomized(channels=8, branches=2, groups=2).eval(), per_branch)
        y_biased, attention_biased = biased(x, return_attention=True)
    assert not torch.allclose(y_biased, y, atol=1e-3)
    # the bias moves weight towards branch 0 for every channel of every image
    assert (attention_biased[:, 0] > attention[:, 0]).all()


def test_single_branch_has_all_ones_attention_and_is_conv_bn_relu():
    module = randomized(channels=8, branches=1, groups=2).eval()
    x = torch.randn(2, 8, 5, 5)
    y, attention = module(x, return_attention=True)
    assert attention.shape == (2, 1, 8, 1, 1)
    assert torch.equal(attention, torch.ones_like(attention))
    torch.testing.assert_close(y, module.split[0](x))


def test_official_initialisation_starts_with_nearly_uniform_selection():
    torch.manual_seed(0)
    module = SelectiveKernel(64, groups=8)  # training mode: the fuse BN uses batch statistics
    x = torch.randn(4, 64, 6, 6)
    _, attention = module(x, return_attention=True)
    deviation = (attention - 0.5).abs().mean()
    assert deviation < 0.03
    # PyTorch's default 1x1-conv init would not start uniform: the test can tell them apart.
    module.fuse.fc.reset_parameters()
    module.select.reset_parameters()
    _, attention = module(x, return_attention=True)
    assert (attention - 0.5).abs().mean() > 0.03


# ---------------------------------------------------------------- gradients and precision

def test_gradients_reach_every_parameter():
    module = randomized(channels=8, out_channels=8, branches=3, groups=2).train()
    x = torch.randn(3, 8, 5, 5, requires_grad=True)
    (module(x) * torch.randn(3, 8, 5, 5)).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("train", [False, True])
def test_gradcheck_float64(train):
    module = randomized(dtype=torch.float64, channels=4, branches=2, groups=2, min_dim=3)
    module.train(train)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_float64_attention_is_not_rounded_to_float32():
    module = randomized(dtype=torch.float64, channels=8, branches=3, groups=2).eval()
    _, attention = module(torch.randn(2, 8, 4, 4, dtype=torch.float64), return_attention=True)
    assert attention.dtype == torch.float64
    assert (attention.sum(dim=1) - 1).abs().max() < 1e-12


def test_bf16_autocast_is_finite_and_close_to_float32():
    module = randomized(channels=16, groups=4).eval()
    x = torch.randn(2, 16, 6, 6)
    y32, a32 = module(x, return_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, a16 = module(x, return_attention=True)
    assert y16.dtype == torch.bfloat16 and a16.dtype == torch.bfloat16
    assert bool(torch.isfinite(y16).all())
    torch.testing.assert_close(a16.float(), a32, atol=2e-2, rtol=0)
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=5e-2)


def test_channels_last_matches_contiguous():
    module = randomized(channels=8, out_channels=16, stride=2, groups=4).eval()
    x = torch.randn(2, 8, 7, 7)
    y, a = module(x, return_attention=True)
    y_cl, a_cl = module(x.to(memory_format=torch.channels_last), return_attention=True)
    torch.testing.assert_close(y_cl, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_cl, a, atol=1e-6, rtol=1e-5)


def test_batch_of_one_in_eval_mode_matches_the_same_image_in_a_batch():
    module = randomized(channels=8, groups=2).eval()
    x = torch.randn(3, 8, 5, 5)
    y_batch = module(x)
    y_one = module(x[1:2])
    assert y_one.shape == (1, 8, 5, 5)
    torch.testing.assert_close(y_one, y_batch[1:2], atol=1e-6, rtol=1e-5)


def test_batch_of_one_in_training_mode_raises_a_clear_error():
    module = SelectiveKernel(8, groups=2).train()
    with pytest.raises(ValueError, match=r"batch of at least 2 in training mode.*got batch size 1"):
        module(torch.randn(1, 8, 5, 5))


# ---------------------------------------------------------------- argument and input checks

def test_seed_hardcoded_groups_fails_for_48_channels_with_a_clear_message():
    # The seed's SK block fixes groups=32; 48 channels then fail deep inside Conv2d.
    with pytest.raises(ValueError, match=r"expected channels divisible by groups=32, got channels=48"):
        SelectiveKernel(48)
    with pytest.raises(ValueError, match=r"expected out_channels divisible by groups=32, got out_channels=48"):
        SelectiveKernel(64, out_channels=48)
    with pytest.raises(ValueError, match=r"divisible by groups=32, got channels=48"):
        create_attention("sk", 48)


@pytest.mark.parametrize("groups", [16, 1])
def test_48_channels_work_with_groups_that_divide_them(groups):
    module = create_attention("sk", 48, groups=groups).eval()
    assert all(branch.conv.groups == groups for branch in module.split)
    y, attention = module(torch.randn(2, 48, 4, 4), return_attention=True)
    assert y.shape == (2, 48, 4, 4) and attention.shape == (2, 2, 48, 1, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=8, branches=0), r"branches .* positive integer, got 0"),
    (dict(channels=8, branches=-1), r"branches .* positive integer, got -1"),
    (dict(channels=8, branches=2.0), r"branches .* positive integer, got 2.0"),
    (dict(channels=0), r"channels to be a positive integer, got 0"),
    (dict(channels=8, out_channels=0), r"out_channels to be a positive integer, got 0"),
    (dict(channels=8, groups=0), r"groups to be a positive integer, got 0"),
    (dict(channels=8, groups=8, stride=0), r"stride to be a positive integer, got 0"),
    (dict(channels=8, groups=8, min_dim=0), r"min_dim \(L\) to be a positive integer, got 0"),
    (dict(channels=8, groups=8, reduction=0), r"positive reduction ratio, got 0"),
    (dict(channels=8, groups=8, reduction=-4), r"positive reduction ratio, got -4"),
    (dict(channels=8, groups=8, reduction="16"), r"positive reduction ratio, got '16'"),
])
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveKernel(**kwargs)


@pytest.mark.parametrize("x, message", [
    (torch.randn(2, 6, 5, 5), r"expected 8 channels \(dim 1\), got 6"),
    (torch.randn(2, 8, 5), r"expected a \[B, C, H, W\] tensor, got shape \[2, 8, 5\]"),
    (torch.ones(2, 8, 5, 5, dtype=torch.int64), r"expected a floating-point tensor, got torch.int64"),
    ([[1.0]], r"expected a torch.Tensor, got list"),
])
def test_bad_inputs_raise(x, message):
    module = SelectiveKernel(8, groups=2).eval()
    with pytest.raises(ValueError, match=rf"SelectiveKernel: {message}"):
        module(x)


# ---------------------------------------------------------------- the seed's pitfalls

def test_seed_softmax_dim0_is_the_branch_axis_only_because_it_stacks_branches_first():
    module = randomized(channels=8, branches=3, groups=2).eval()
    captured = {}
    module.select.register_forward_hook(lambda mod, inputs, out: captured.setdefault("logits", out))
    _, attention = module(torch.randn(2, 8, 5, 5), return_attention=True)
    logits = captured["logits"].unflatten(1, (3, 8))                  # ours: [B, M, C, 1, 1]

    # The seed stacks the branches first ([M, B, C, 1, 1]) and uses softmax(dim=0): same axis.
    seed_layout = logits.transpose(0, 1)
    torch.testing.assert_close(torch.softmax(seed_layout, dim=0).transpose(0, 1), attention)
    # The same dim=0 on a batch-first stack normalises over the batch instead.
    over_batch = torch.softmax(logits, dim=0)
    assert (over_batch.sum(dim=1) - 1).abs().max() > 0.1
    # A softmax over the channels normalises each branch across channels, not across branches.
    over_channels = torch.softmax(logits, dim=2)
    torch.testing.assert_close(over_channels.sum(dim=2), torch.ones(2, 3, 1, 1))
    assert (over_channels.sum(dim=1) - 1).abs().max() > 0.1
    assert not torch.allclose(over_channels, attention)


def test_forward_prints_nothing(capsys):
    module = SelectiveKernel(8, groups=2)
    x = torch.randn(2, 8, 5, 5)
    module(x)
    module.eval()(x, return_attention=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def full_width_variant_parameters(channels: int, kernels=(1, 3, 5, 7), reduction: int = 16,
                                  min_dim: int = 32) -> int:
    """Parameters of the circulating "SK attention" variant: one dense k x k convolution with bias
    per kernel size on the full width, each with BN; Linear(C, d); one Linear(d, C) per kernel."""
    d = max(channels // reduction, min_dim)
    convs = sum(channels * channels * k * k + channels for k in kernels)
    bns = len(kernels) * 2 * channels
    return convs + bns + (channels * d + d) + len(kernels) * (d * channels + channels)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_width_1357_variant_costs_over_20m_parameters_and_ours_is_far_smaller():
    formula = full_width_variant_parameters(512)
    with torch.device("meta"):  # build it without allocating 88 MB, only to check the formula
        d = max(512 // 16, 32)
        built = nn.ModuleList(
            [nn.Conv2d(512, 512, k, padding=k // 2) for k in (1, 3, 5, 7)]
            + [nn.BatchNorm2d(512) for _ in range(4)]
            + [nn.Linear(512, d)] + [nn.Linear(d, 512) for _ in range(4)]
        )
    assert count(built) == formula == 22_110_240
    assert formula > 20_000_000

    ours = SelectiveKernel(512)  # M = 2, G = 32, r = 16, L = 32
    d = ours.hidden
    assert count(ours) == 2 * (512 * (512 // 32) * 9 + 2 * 512) + 512 * d + 2 * d + d * 2 * 512
    assert count(ours) == 198_720
    assert formula > 100 * count(ours)
    assert count(SelectiveKernel(512, groups=1)) == 4_769_856


# ---------------------------------------------------------------- where the backbone puts it

def test_backbone_replaces_each_second_conv_with_a_dense_sk_unit():
    model = resnet18(num_classes=10, attention="sk", width=8).eval()
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
              for block in stage]
    for block in blocks:
        assert isinstance(block.conv2, SelectiveKernel)
        assert (block.conv2.groups, block.conv2.stride) == (1, 1)
        assert block.conv2.channels == block.conv2.out_channels == block.bn2.num_features
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with torch.device("meta"):
        added = count(resnet18(100, attention="sk")) - count(resnet18(100))
    assert added == 6_459_392  # the figure quoted in the module docstring


# ---------------------------------------------------------------- timm, with matched definitions

def to_timm_state(module: SelectiveKernel) -> dict[str, torch.Tensor]:
    renames = {"split.": "paths.", "fuse.fc.": "attn.fc_reduce.", "fuse.bn.": "attn.bn.",
               "select.": "attn.fc_select."}
    state = {}
    for key, value in module.state_dict().items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        state[key] = value
    return state


@pytest.mark.parametrize("kwargs", [
    dict(channels=32, groups=8),
    dict(channels=16, out_channels=32, stride=2, branches=3, groups=4, min_dim=8),
])
def test_matches_timm_selective_kernel_with_matched_options(kwargs):
    timm_layers = pytest.importorskip("timm.layers")
    ours = randomized(**kwargs).eval()
    # timm's defaults differ (input split across branches, d without the floor L); these
    # options make it the paper's unit: 3x3 kernels with dilation 1..M on the whole input.
    theirs = timm_layers.SelectiveKernel(
        ours.channels, ours.out_channels, kernel_size=[2 * m + 1 for m in range(1, ours.branches + 1)],
        stride=ours.stride, groups=ours.groups, rd_channels=ours.hidden, keep_3x3=True,
        split_input=False,
    ).eval()
    theirs.load_state_dict(to_timm_state(ours))
    captured = {}
    theirs.attn.register_forward_hook(lambda mod, inputs, out: captured.setdefault("attention", out))
    x = torch.randn(2, ours.channels, 9, 8)
    y, attention = ours(x, return_attention=True)
    torch.testing.assert_close(theirs(x), y)
    torch.testing.assert_close(captured["attention"], attention)
