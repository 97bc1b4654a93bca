"""Tests for the non-local block (Wang, Girshick, Gupta, He; CVPR 2018).

The reference below is written from the paper's equations with explicit loops over the query
position i and the key position j, in float64, using the module's own weights. The seed pitfalls
(the simple ``NonLocalBlock`` of a widely reposted Zhihu post) are re-stated in a few lines and shown to fail where ours
does not.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from attn_lib import create_attention
from attn_lib.modules.nonlocal_block import NonLocalBlock

MODES = ("gaussian", "embedded", "dot", "concat")
SOFTMAX_MODES = ("gaussian", "embedded")
FUSED_MODES = ("gaussian", "embedded", "dot")
# Odd sizes on purpose: max-pooling floors them (5 -> 2, 3 -> 1).
SPATIAL = {1: (5,), 2: (3, 5), 3: (2, 2, 3)}
POOL_KERNEL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
CHANNELS = 4


def randomise(block: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (the zero-initialised BN γ, β or W_z too) and BN statistic a random,
    non-zero value, so that every term of the equation shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for module in block.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return block


def make_block(mode: str, dim: int, seed: int = 0, **kwargs) -> NonLocalBlock:
    block = NonLocalBlock(CHANNELS, mode=mode, dim=dim, **kwargs).double()
    return randomise(block, seed).eval()


def make_input(dim: int, batch: int = 2, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CHANNELS, *SPATIAL[dim], generator=generator, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The naive reference: the paper's equations, one pair (i, j) at a time.
# --------------------------------------------------------------------------------------------

def conv1x1(conv: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as the matrix it is: ``[C_in, *S] -> [C_out, *S]``."""
    weight = conv.weight.reshape(conv.weight.shape[0], -1)
    return torch.einsum("oc,c...->o...", weight, v) + conv.bias.reshape(-1, *[1] * (v.dim() - 1))


def max_pool(v: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Non-overlapping max-pooling of ``[ch, *S]`` written out: crop each axis to a multiple of its
    kernel (floor), split it into (windows, kernel) and take the max over the kernel axes."""
    for axis, k in enumerate(kernel, start=1):
        size = v.shape[axis] // k * k
        v = v.narrow(axis, 0, size)
        v = v.unflatten(axis, (size // k, k)).amax(dim=axis + 1)
    return v


def naive_nonlocal(block: NonLocalBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` and the weights ``f(x_i, x_j) / C(x)`` of Eqs. (1) and (6); block in eval mode."""
    assert not block.training
    kernel = POOL_KERNEL[block.dim]
    pool = (lambda v: max_pool(v, kernel)) if block.sub_sample else (lambda v: v)
    outputs, maps = [], []
    for xb in x:  # [C, *S]
        if block.mode == "gaussian":
            theta, phi = xb, pool(xb)
            g = conv1x1(block.g, pool(xb)) if block.pool_input else pool(conv1x1(block.g, xb))
        else:
            theta = conv1x1(block.theta, xb)
            if block.pool_input:
                phi, g = conv1x1(block.phi, pool(xb)), conv1x1(block.g, pool(xb))
            else:
                phi, g = pool(conv1x1(block.phi, xb)), pool(conv1x1(block.g, xb))
        theta, phi, g = theta.flatten(1), phi.flatten(1), g.flatten(1)  # [d, N], [d, N'], [d, N']
        n, n_keys = theta.shape[1], phi.shape[1]
        scale = 1.0 / math.sqrt(theta.shape[0]) if block.scale else 1.0
        f = torch.zeros(n, n_keys, dtype=x.dtype)
        for i in range(n):
            for j in range(n_keys):
                if block.mode in ("gaussian", "embedded"):
                    f[i, j] = torch.exp(scale * torch.dot(theta[:, i], phi[:, j]))
                elif block.mode == "dot":
                    f[i, j] = scale * torch.dot(theta[:, i], phi[:, j])
                else:  # concat: w_f applied to the concatenated pair, then ReLU
                    pair = torch.cat([theta[:, i], phi[:, j]])
                    f[i, j] = torch.relu(torch.dot(block.w_f.weight[0], pair))
        weights = torch.zeros_like(f)
        y = torch.zeros(g.shape[0], n, dtype=x.dtype)
        for i in range(n):
            normaliser = f[i].sum() if block.mode in ("gaussian", "embedded") else n_keys
            for j in range(n_keys):
                weights[i, j] = f[i, j] / normaliser
                y[:, i] += weights[i, j] * g[:, j]
        w_y = conv1x1(block.w_z, y.reshape(-1, *xb.shape[1:]))
        if block.bn_layer:
            bn = block.bn
            shape = (-1,) + (1,) * block.dim
            mean, var = bn.running_mean.reshape(shape), bn.running_var.reshape(shape)
            w_y = (w_y - mean) / torch.sqrt(var + bn.eps)
            w_y = w_y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        outputs.append(w_y + xb)
        maps.append(weights)
    return torch.stack(outputs), torch.stack(maps)


SAMPLING = [
    pytest.param(False, False, id="full"),
    pytest.param(True, False, id="pool-after-phi-g"),
    pytest.param(True, True, id="pool-input"),
]


@pytest.mark.parametrize("sub_sample, pool_input", SAMPLING)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_matches_naive_reference(mode, dim, sub_sample, pool_input):
    block = make_block(mode, dim, sub_sample=sub_sample, pool_input=pool_input)
    x = make_input(dim)
    expected_z, expected_map = naive_nonlocal(block, x)
    with torch.no_grad():
        z_default = block(x)  # "auto": the fused path where one exists
        z_explicit, attention = block(x, return_attention=True)
    torch.testing.assert_close(z_default, expected_z)
    torch.testing.assert_close(z_explicit, expected_z)
    torch.testing.assert_close(attention, expected_map)


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_scale_option_matches_naive_reference(mode):
    block = make_block(mode, 2, scale=True)
    x = make_input(2)
    expected_z, expected_map = naive_nonlocal(block, x)
    with torch.no_grad():
        z, attention = block(x, return_attention=True)
        torch.testing.assert_close(block(x), expected_z)
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(attention, expected_map)
    # ...and the option does change the block (1/sqrt(d) != 1).
    unscaled = make_block(mode, 2, scale=False)
    with torch.no_grad():
        assert not torch.allclose(unscaled(x), z)


def test_a_scale_on_the_dot_form_is_absorbed_by_w_z():
    """Why ``scale=True`` is refused for dot: the official code never scales its dot branch, and
    there a constant factor k on θᵀφ only multiplies y by k, which W_z absorbs exactly (the
    same block with W_z's weight times k). In the softmax forms it is a temperature and is not
    absorbed (see ``test_scale_option_matches_naive_reference``)."""
    block = make_block("dot", 2, bn_layer=False)
    x = make_input(2)
    k = 1.0 / math.sqrt(block.inter_channels)
    theta, phi, g = block.embed(x)
    with torch.no_grad():
        y_scaled = (k * block.pairwise_weights(theta, phi)) @ g  # a hand-scaled dot form
        z_scaled = torch.einsum("cd,bnd->bcn", block.w_z.weight.flatten(1), y_scaled)
        z_scaled = z_scaled + block.w_z.bias[:, None]
        z_scaled = z_scaled.reshape(x.shape) + x
        absorbed = make_block("dot", 2, bn_layer=False)
        absorbed.w_z.weight.mul_(k)
        torch.testing.assert_close(absorbed(x), z_scaled)
        assert not torch.allclose(block(x), z_scaled)


def test_pooling_order_options_are_different_functions():
    """Max-pooling does not commute with a 1x1 convolution: the paper's "pool after φ and g" and
    the official code's "pool the input" are two blocks, not one."""
    x = make_input(2)
    after = make_block("embedded", 2, pool_input=False)
    before = make_block("embedded", 2, pool_input=True)
    with torch.no_grad():
        assert not torch.allclose(after(x), before(x))


# --------------------------------------------------------------------------------------------
# Fused == explicit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mode, scale", [(m, False) for m in FUSED_MODES] + [(m, True) for m in SOFTMAX_MODES]
)
def test_fused_equals_explicit(mode, scale):
    explicit = make_block(mode, 2, implementation="explicit", scale=scale).train()
    fused = make_block(mode, 2, implementation="fused", scale=scale).train()
    fused.load_state_dict(explicit.state_dict())
    x = make_input(2, batch=3)
    x_explicit, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    z_explicit, z_fused = explicit(x_explicit), fused(x_fused)
    torch.testing.assert_close(z_fused, z_explicit)
    grad_out = torch.randn_like(z_explicit)
    z_explicit.backward(grad_out)
    z_fused.backward(grad_out)
    torch.testing.assert_close(x_fused.grad, x_explicit.grad)
    for (name, p_explicit), p_fused in zip(explicit.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_explicit.grad, msg=name)


class _RecordShapes(TorchFunctionMode):
    """Records the shape of every tensor that a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(t.shape)
        return out


@pytest.mark.parametrize("mode", FUSED_MODES)
def test_fused_path_never_builds_the_n_by_n_map(mode):
    """The seed returns the N x N map on every call; ours builds no [N, N'] tensor unless asked.
    (For gaussian and embedded the map, if any, is the fused kernel's own business.)"""
    block = NonLocalBlock(CHANNELS, mode=mode, sub_sample=False).eval()
    x = torch.randn(1, CHANNELS, 8, 8)  # N = N' = 64: the map has 4096 entries, x 256
    with torch.no_grad(), _RecordShapes() as fused_run:
        block(x)
    assert max(s.numel() for s in fused_run.shapes) < 64 * 64
    with torch.no_grad(), _RecordShapes() as explicit_run:
        block(x, return_attention=True)
    assert torch.Size([1, 64, 64]) in explicit_run.shapes  # the recorder does see the map


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_initialisation(mode, dim, bn_layer):
    torch.manual_seed(0)
    block = NonLocalBlock(CHANNELS, mode=mode, dim=dim, bn_layer=bn_layer)
    x = make_input(dim, dtype=torch.float32)
    for training in (True, False):
        block.train(training)
        with torch.no_grad():
            z, attention = block(x, return_attention=True)
        assert torch.equal(z, x)
    # Identity, but not dead: the non-local term itself is non-zero, only W_z (or γ) hides it.
    assert attention.abs().sum() > 0


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_softmax_rows_sum_to_one(mode, dim):
    block = make_block(mode, dim)
    with torch.no_grad():
        _, attention = block(make_input(dim), return_attention=True)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention[..., 0]))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_permutation_equivariance_without_sub_sampling(mode, dim):
    """Every position sees every other through the same weights: shuffling the positions of x
    shuffles the output (and the map's rows and columns) the same way."""
    block = make_block(mode, dim, sub_sample=False)
    x = make_input(dim)
    n = math.prod(SPATIAL[dim])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    x_perm = x.flatten(2)[:, :, perm].reshape(x.shape)
    with torch.no_grad():
        z, attention = block(x, return_attention=True)
        z_perm, attention_perm = block(x_perm, return_attention=True)
    torch.testing.assert_close(z_perm, z.flatten(2)[:, :, perm].reshape(x.shape))
    torch.testing.assert_close(attention_perm, attention[:, perm][:, :, perm])


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_parameter(mode):
    block = make_block(mode, 2).train()  # randomised: BN γ != 0, so θ, φ, g get a signal
    x = make_input(2).requires_grad_()
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_at_initialisation_only_bn_gamma_gets_a_gradient_signal():
    """With γ = 0 the block is the identity; the gradient still reaches γ, so it can learn."""
    torch.manual_seed(0)
    block = NonLocalBlock(CHANNELS)
    block(make_input(2, dtype=torch.float32)).square().sum().backward()
    assert block.bn.weight.grad.abs().sum() > 0
    assert block.theta.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("implementation", ["explicit", "auto"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode, implementation):
    block = make_block(mode, 2, implementation=implementation)
    x = make_input(2, batch=1)[:, :, :3, :4].contiguous().requires_grad_()
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------------------------
# Precision, memory layout, batch size 1
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_autocast(mode):
    block = randomise(NonLocalBlock(8, mode=mode)).eval()
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_reference = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_fused = block(x)
            z_explicit, attention = block(x, return_attention=True)
    for z in (z_fused, z_explicit):
        assert torch.isfinite(z).all()
        torch.testing.assert_close(z.float(), z_reference, atol=0.1, rtol=0.05)
    assert not torch.equal(z_reference, x)  # the non-local term is really in the comparison
    if mode in SOFTMAX_MODES:
        # Softmax statistics in float32 on the explicit path, not bf16 (8 bits of mantissa).
        assert attention.dtype == torch.float32
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 36), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "dim, memory_format", [(2, torch.channels_last), (3, torch.channels_last_3d)]
)
@pytest.mark.parametrize("mode", MODES)
def test_channels_last_matches_contiguous(mode, dim, memory_format):
    block = make_block(mode, dim)
    x = make_input(dim)
    with torch.no_grad():
        expected_default, (expected, expected_map) = block(x), block(x, return_attention=True)
        x_cl = x.to(memory_format=memory_format)
        got_default, (got, got_map) = block(x_cl), block(x_cl, return_attention=True)
    torch.testing.assert_close(got_default, expected_default)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_map, expected_map)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_batch_of_one_in_eval_mode_equals_its_row_of_a_batch(dim):
    block = make_block("embedded", dim)
    x = make_input(dim, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(block(x[1:2]), block(x)[1:2])


def test_video_with_one_frame_works_since_time_is_not_pooled():
    block = make_block("embedded", 3)
    x = torch.randn(1, CHANNELS, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        _, attention = block(x, return_attention=True)
    assert attention.shape == (1, 16, 4)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "embedded_gaussian"},
         r"expected mode in gaussian, embedded, dot, concat, got 'embedded_gaussian'"),
        ({"dim": 4}, r"expected dim 1, 2 or 3, got 4"),
        ({"implementation": "flash"},
         r"expected implementation in auto, explicit, fused, got 'flash'"),
        ({"mode": "concat", "implementation": "fused"},
         r"expected implementation 'auto' or 'explicit' for mode 'concat'.*got 'fused'"),
        ({"mode": "concat", "scale": True}, r"expected scale=False for mode 'concat'.*got True"),
        ({"mode": "dot", "scale": True},
         r"expected scale=False for mode 'dot': the official code scales θᵀφ only before its "
         r"softmax.*got True"),
        ({"inter_channels": 0}, r"expected inter_channels to be a positive integer, got 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonLocalBlock(8, **kwargs)


def test_one_channel_leaves_no_inter_channels():
    with pytest.raises(ValueError, match=r"leaves 1 // 2 = 0 hidden channels"):
        NonLocalBlock(1)
    assert NonLocalBlock(1, inter_channels=1).inter_channels == 1  # explicit width is fine


@pytest.mark.parametrize(
    "dim, shape, match",
    [
        (2, (2, 8, 16), r"expected a \[B, C, H, W\] tensor, got shape \[2, 8, 16\]"),
        (1, (2, 8, 4, 4), r"expected a \[B, C, T\] tensor, got shape \[2, 8, 4, 4\]"),
        (3, (2, 8, 4, 4), r"expected a \[B, C, T, H, W\] tensor, got shape \[2, 8, 4, 4\]"),
        (2, (2, 6, 4, 4), r"expected 8 channels \(dim 1\), got 6"),
        (2, (2, 8, 1, 4),
         r"sub_sample max-pools H, W by 2, expected each of them >= 2, got shape \[2, 8, 1, 4\]"),
        (3, (2, 8, 4, 4, 1),
         r"max-pools H, W by 2, expected each of them >= 2, got shape \[2, 8, 4, 4, 1\]"),
        (1, (2, 8, 1),
         r"sub_sample max-pools T by 2, expected each of them >= 2, got shape \[2, 8, 1\]"),
    ],
)
def test_forward_rejects_bad_input(dim, shape, match):
    block = NonLocalBlock(8, dim=dim)
    with pytest.raises(ValueError, match=match):
        block(torch.randn(shape))


def test_forward_rejects_integer_input():
    with pytest.raises(ValueError, match=r"expected a floating-point tensor, got torch.int64"):
        NonLocalBlock(8)(torch.ones(1, 8, 4, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# The Zhihu post's simple NonLocalBlock, re-stated
# --------------------------------------------------------------------------------------------

class SeedStyleNonLocal(nn.Module):
    """What the Zhihu post's simple block does, in our words: θ, φ, g are 1x1 convolutions to C/2
    channels, but their outputs are reshaped as ``view(b, c, -1)`` with the *input's* C, the
    softmax runs over dim 1 (the query axis), and the output convolution keeps PyTorch's default
    (non-zero) initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.inter = channels // 2
        self.theta, self.phi, self.g = (
            nn.Conv2d(channels, self.inter, 1, bias=False) for _ in range(3)
        )
        self.mask = nn.Conv2d(self.inter, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        phi = self.phi(x).view(b, c, -1)  # the bug: a C/2-channel tensor viewed with C rows
        theta = self.theta(x).view(b, c, -1).transpose(1, 2)
        g = self.g(x).view(b, c, -1).transpose(1, 2)
        attention = torch.softmax(theta @ phi, dim=1)  # normalised over queries, not keys
        y = (attention @ g).transpose(1, 2).reshape(b, self.inter, h, w)
        return self.mask(y) + x, attention


def test_seed_reshape_gives_a_half_size_map_ours_gives_n_by_n_prime():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)  # H·W = 16
    _, seed_map = SeedStyleNonLocal(8)(x)
    assert seed_map.shape == (2, 8, 8)  # (HW/2) x (HW/2): its "positions" are not pixels
    _, our_map = NonLocalBlock(8)(x, return_attention=True)
    assert our_map.shape == (2, 16, 4)  # N = 16 queries, N' = 2·2 = 4 pooled keys
    _, our_full_map = NonLocalBlock(8, sub_sample=False)(x, return_attention=True)
    assert our_full_map.shape == (2, 16, 16)


def test_seed_reshape_crashes_on_odd_positions_ours_works():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 5)  # H·W = 15 is odd
    with pytest.raises(RuntimeError):
        SeedStyleNonLocal(8)(x)
    z, attention = NonLocalBlock(8)(x, return_attention=True)
    assert z.shape == x.shape and attention.shape == (2, 15, 2)


def test_seed_mixes_positions_ours_is_permutation_equivariant():
    """The seed's reshape glues two pixels' features into one "position", so shuffling pixels
    does not simply shuffle its output; ours does (see also the equivariance test above)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4)
    perm = torch.randperm(16)
    x_perm = x.flatten(2)[:, :, perm].reshape(x.shape)
    permute = lambda t: t.flatten(2)[:, :, perm].reshape(t.shape)  # noqa: E731

    seed = SeedStyleNonLocal(8)
    with torch.no_grad():
        seed_z, seed_z_perm = seed(x)[0], seed(x_perm)[0]
    assert not torch.allclose(seed_z_perm, permute(seed_z), atol=1e-4)

    ours = randomise(NonLocalBlock(8, sub_sample=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x_perm), permute(ours(x)))


def test_seed_normalises_over_queries_ours_over_keys():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    _, seed_map = SeedStyleNonLocal(8)(x)
    ones = torch.ones(2, 8)
    torch.testing.assert_close(seed_map.sum(dim=1), ones)  # columns sum to 1...
    assert not torch.allclose(seed_map.sum(dim=-1), ones, atol=1e-3)  # ...rows do not

    block = randomise(NonLocalBlock(8, sub_sample=False)).eval()
    with torch.no_grad():
        _, our_map = block(x, return_attention=True)
    ones = torch.ones(2, 16)
    torch.testing.assert_close(our_map.sum(dim=-1), ones)  # each query's weights over keys
    assert not torch.allclose(our_map.sum(dim=1), ones, atol=1e-3)


def test_seed_is_not_the_identity_at_init_ours_is():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        seed_z, _ = SeedStyleNonLocal(8)(x)
        our_z = NonLocalBlock(8)(x)
    assert not torch.allclose(seed_z, x, atol=1e-3)
    assert torch.equal(our_z, x)


# --------------------------------------------------------------------------------------------
# Size, defaults, and timm
# --------------------------------------------------------------------------------------------

def test_parameter_count_for_256_channels():
    """After stage 3 of a CIFAR ResNet-18 (256 channels): θ, φ, g are 1x1 convolutions 256 -> 128
    with bias, W_z is 128 -> 256 with bias, and the BN adds γ and β."""
    c, d = 256, 128
    convs = 3 * (c * d + d) + (d * c + c)  # 131,712
    block = NonLocalBlock(c, mode="embedded", dim=2, bn_layer=True)
    assert sum(p.numel() for p in block.parameters()) == convs + 2 * c == 132_224
    no_bn = NonLocalBlock(c, mode="embedded", dim=2, bn_layer=False)
    assert sum(p.numel() for p in no_bn.parameters()) == convs == 131_712
    gaussian = NonLocalBlock(c, mode="gaussian")  # no θ, φ
    assert sum(p.numel() for p in gaussian.parameters()) == (c * d + d) + (d * c + c) + 2 * c
    concat = NonLocalBlock(c, mode="concat")  # + w_f, 2d -> 1, no bias
    assert sum(p.numel() for p in concat.parameters()) == convs + 2 * c + 2 * d


def test_defaults_are_the_papers():
    block = create_attention("nonlocal", 64)
    assert isinstance(block, NonLocalBlock)
    settings = (block.mode, block.dim, block.sub_sample, block.bn_layer, block.scale)
    assert settings == ("embedded", 2, True, True, False)
    assert block.inter_channels == 32
    assert isinstance(block.pool, nn.MaxPool2d) and isinstance(block.bn, nn.BatchNorm2d)


def test_timm_non_local_attn_with_copied_weights():
    """timm's NonLocalAttn is the embedded-gaussian block without sub-sampling, with biases and a
    BN after W_z, like ours. It differs in the scale: with ``use_scale=True`` (its default) timm
    multiplies θᵀφ by 1/sqrt(channels), the official code (and our ``scale=True``) by
    1/sqrt(inter_channels)."""
    timm_layers = pytest.importorskip("timm.layers")
    c, d = 16, 8
    ours = randomise(NonLocalBlock(c, sub_sample=False, inter_channels=d)).eval()
    theirs = timm_layers.NonLocalAttn(c, use_scale=False, rd_channels=d).eval()
    mapping = {"t": ours.theta, "p": ours.phi, "g": ours.g, "z": ours.w_z, "norm": ours.bn}
    for their_name, our_module in mapping.items():
        getattr(theirs, their_name).load_state_dict(our_module.state_dict())
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    x = torch.randn(2, c, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))

        theirs_scaled = timm_layers.NonLocalAttn(c, use_scale=True, rd_channels=d).eval()
        theirs_scaled.load_state_dict(theirs.state_dict())
        ours_scaled = NonLocalBlock(c, sub_sample=False, inter_channels=d, scale=True).eval()
        ours_scaled.load_state_dict(ours.state_dict())
        assert not torch.allclose(ours_scaled(x), theirs_scaled(x), atol=1e-4)
        # timm's 1/sqrt(C) is ours 1/sqrt(d) with θ multiplied by sqrt(d / C).
        ours_scaled.theta.weight.mul_(math.sqrt(d / c))
        ours_scaled.theta.bias.mul_(math.sqrt(d / c))
        torch.testing.assert_close(ours_scaled(x), theirs_scaled(x))



def test_nonlocal_benchmark_rows_tiny_cpu_run():
    """The chapter's benchmark runs (tiny settings: it is a benchmark, its timings are not
    tested) and labels what the 'fused' form of each mode is."""
    from attn_lib.bench_modules import bench_nonlocal

    out = bench_nonlocal("cpu", attn_sizes=(4,), attn_batch=1, attn_channels=8, attn_rounds=1,
                         min_seconds=0.0, command="test")
    rows = {row["module"]: row for row in out["rows"]}
    assert set(rows) == {"nonlocal", "nonlocal_dot"}
    assert rows["nonlocal_dot"]["fused_kernel"].startswith("re-associated")
    assert rows["nonlocal"]["attention_map_mib"] == 1 * 16 * 16 * 4 / 2**20
    assert out["command"] == "test" and out["git_commit"]
    assert all(row["explicit_seconds"] > 0 and row["fused_seconds"] > 0 for row in rows.values())
