"""CBAM (attn_lib.modules.cbam): the paper's equations, its ordering, the official options."""
import pytest
import torch
from torch import nn

from attn_lib.modules.cbam import CBAM, ChannelGate, SpatialGate


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise_spatial_bn(cbam: CBAM) -> None:
    """Give the (zero-initialised) spatial BatchNorm non-trivial parameters and statistics."""
    bn = cbam.spatial_gate.bn
    with torch.no_grad():
        bn.weight.fill_(0.7)
        bn.bias.fill_(-0.2)
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(1.8)


def naive_cbam(x: torch.Tensor, cbam: CBAM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eqs. 1-3 of Woo et al. in float64, with explicit loops over channels and pixels and
    ``cbam``'s own weights; returns ``(y, M_c, M_s)``. BatchNorm in eval mode only."""
    x = x.detach().double()
    B, C, H, W = x.shape
    mlp = cbam.channel_gate.mlp
    W0, W1 = mlp[0].weight.detach().double(), mlp[2].weight.detach().double()
    zeros = torch.zeros(W0.shape[0] + W1.shape[0], dtype=x.dtype)
    b0 = mlp[0].bias.detach().double() if mlp[0].bias is not None else zeros[: W0.shape[0]]
    b1 = mlp[2].bias.detach().double() if mlp[2].bias is not None else zeros[W0.shape[0]:]
    gate = cbam.spatial_gate
    kernel = gate.conv.weight.detach().double()[0]  # [2, k, k]
    k = kernel.shape[-1]

    def shared_mlp(v):
        return W1 @ torch.relu(W0 @ v + b0) + b1

    m_c = torch.empty(B, C, 1, 1, dtype=x.dtype)
    m_s = torch.empty(B, 1, H, W, dtype=x.dtype)
    refined = torch.empty_like(x)
    for n in range(B):
        avg = torch.stack([x[n, c].sum() / (H * W) for c in range(C)])
        mx = torch.stack([x[n, c].max() for c in range(C)])
        m_c[n, :, 0, 0] = torch.sigmoid(shared_mlp(avg) + shared_mlp(mx))
        for c in range(C):
            refined[n, c] = m_c[n, c, 0, 0] * x[n, c]  # F' = M_c(F) * F
        mean_map = sum(refined[n, c] for c in range(C)) / C
        max_map = torch.stack([refined[n, c] for c in range(C)]).max(dim=0).values
        maps = [mean_map, max_map] if gate.pool_order == "mean_max" else [max_map, mean_map]
        for i in range(H):
            for j in range(W):
                acc = gate.conv.bias.double().item() if gate.conv.bias is not None else 0.0
                for m in range(2):
                    for u in range(k):
                        for v in range(k):
                            ii, jj = i + u - k // 2, j + v - k // 2
                            if 0 <= ii < H and 0 <= jj < W:  # zero padding
                                acc += kernel[m, u, v].item() * maps[m][ii, jj].item()
                if isinstance(gate.bn, nn.BatchNorm2d):
                    bn = gate.bn
                    acc = ((acc - bn.running_mean.item()) / (bn.running_var.item() + bn.eps) ** 0.5
                           * bn.weight.item() + bn.bias.item())
                m_s[n, 0, i, j] = torch.sigmoid(torch.tensor(acc, dtype=x.dtype))
    return refined * m_s, m_c, m_s  # F'' = M_s(F') * F'


@pytest.mark.parametrize("options", [
    dict(),  # the paper's form
    dict(spatial_bn=True, pool_order="max_mean"),  # the official code's form
    dict(bias=False, kernel_size=3),
])
def test_matches_naive_reference(options):
    cbam = CBAM(8, reduction=2, **options).double().eval()
    if options.get("spatial_bn"):
        _randomise_spatial_bn(cbam)
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    y, att = cbam(x, return_attention=True)
    y_ref, m_c, m_s = naive_cbam(x, cbam)
    torch.testing.assert_close(att["channel"], m_c)
    torch.testing.assert_close(att["spatial"], m_s)
    torch.testing.assert_close(y, y_ref)


def test_attention_dict_is_what_was_applied():
    cbam = CBAM(32)
    x = torch.randn(3, 32, 6, 5)
    y, att = cbam(x, return_attention=True)
    assert set(att) == {"channel", "spatial"}
    assert att["channel"].shape == (3, 32, 1, 1) and att["spatial"].shape == (3, 1, 6, 5)
    assert torch.equal(y, (x * att["channel"]) * att["spatial"])
    for gate in att.values():
        assert ((gate > 0) & (gate < 1)).all()
    assert torch.equal(cbam(x), y)


def test_channel_gate_first_then_spatial_gate_on_the_refined_map():
    cbam = CBAM(16, reduction=4).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    y, att = cbam(x, return_attention=True)
    channel_gate, spatial_gate = cbam.channel_gate, cbam.spatial_gate
    # M_s is computed from F' = M_c * F, not from F ...
    torch.testing.assert_close(att["spatial"], spatial_gate.attention(x * att["channel"]))
    assert not torch.allclose(att["spatial"], spatial_gate.attention(x))
    # ... and the result is not what the spatial-first arrangement (paper, Table 4) gives.
    spatial_first = spatial_gate(x)
    spatial_first = channel_gate(spatial_first)
    assert not torch.allclose(y, spatial_first)
    torch.testing.assert_close(y, spatial_gate(channel_gate(x)))


def test_pool_order_matters_unless_the_kernel_is_swapped():
    paper = CBAM(16, reduction=4, pool_order="mean_max").double()
    official = CBAM(16, reduction=4, pool_order="max_mean").double()
    official.load_state_dict(paper.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    assert not torch.allclose(paper(x), official(x))
    with torch.no_grad():  # swap the convolution's two input channels: [mean, max] <-> [max, mean]
        official.spatial_gate.conv.weight.copy_(paper.spatial_gate.conv.weight.flip(1))
    torch.testing.assert_close(paper(x), official(x))


def test_one_mlp_is_shared_by_both_pooled_descriptors():
    gate = ChannelGate(64, reduction=16)
    linears = [m for m in gate.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    assert sum(p.numel() for p in gate.parameters()) == 2 * 64 * 4 + 4 + 64
    # Both descriptors count: a spike at one pixel barely moves the mean but sets the max.
    x = torch.randn(1, 64, 4, 4).double()
    gate = gate.double()
    spiked = x.clone()
    spiked[0, :, 0, 0] += 10.0
    avg_only = torch.sigmoid(2 * gate.mlp(x.mean(dim=(2, 3))))
    assert not torch.allclose(gate.attention(x).flatten(), avg_only.flatten())
    assert not torch.allclose(gate.attention(spiked), gate.attention(x), atol=1e-3)


def test_official_spatial_batchnorm_starts_the_gate_at_one_half():
    cbam = CBAM(16, spatial_bn=True, pool_order="max_mean")
    gate = cbam.spatial_gate
    assert gate.conv.bias is None
    assert isinstance(gate.bn, nn.BatchNorm2d) and gate.bn.momentum == 0.01
    assert (gate.bn.weight == 0).all() and (gate.bn.bias == 0).all()
    x = torch.randn(2, 16, 5, 5)
    for mode in (cbam.train, cbam.eval):
        mode()
        _, att = cbam(x, return_attention=True)
        assert torch.equal(att["spatial"], torch.full_like(att["spatial"], 0.5))


def test_paper_form_has_no_batchnorm_and_a_conv_bias():
    gate = CBAM(16).spatial_gate
    assert isinstance(gate.bn, nn.Identity) and gate.conv.bias is not None
    assert gate.conv.weight.shape == (1, 2, 7, 7)
    channel_params, spatial_params = 2 * 512 * 32 + 32 + 512, 2 * 7 * 7 + 1
    assert sum(p.numel() for p in CBAM(512).parameters()) == channel_params + spatial_params


def test_reduction_that_leaves_no_hidden_unit_raises():
    # Seed pitfall: `in_planes // ratio` with no floor is 0 below 16 channels.
    with pytest.raises(ValueError, match=r"0 hidden channels.*expected reduction <= 8"):
        CBAM(8)
    with pytest.raises(ValueError, match="0 hidden"):
        ChannelGate(15)
    assert CBAM(16).channel_gate.hidden == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=4), "expected an odd kernel_size, got 4"),
    (dict(kernel_size=0), "expected kernel_size to be a positive integer, got 0"),
    (dict(kernel_size=7.0), "expected kernel_size to be a positive integer, got 7.0"),
    (dict(pool_order="avg_max"), r"expected pool_order in \('mean_max', 'max_mean'\), got 'avg_max"),
    (dict(reduction=0), "expected a positive reduction ratio, got 0"),
])
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBAM(32, **kwargs)


@pytest.mark.parametrize("module, x, match", [
    (CBAM(32), torch.randn(2, 16, 4, 4), r"CBAM: expected 32 channels.*got 16"),
    (CBAM(32), torch.randn(2, 32, 4), r"expected a \[B, C, H, W\] tensor, got shape \[2, 32, 4\]"),
    (CBAM(32), torch.ones(1, 32, 2, 2, dtype=torch.long), "expected a floating-point tensor"),
    (ChannelGate(32), torch.randn(2, 31, 4, 4), r"ChannelGate: expected 32 channels.*got 31"),
    (SpatialGate(), torch.randn(2, 8, 4), r"SpatialGate: expected a \[B, C, H, W\] tensor, got"),
    (SpatialGate(), torch.randn(8), r"SpatialGate: expected a \[B, C, H, W\].*got shape \[8\]"),
    (SpatialGate(), "image", "SpatialGate: expected a torch.Tensor, got str"),
])
def test_bad_input_raises_value_error_naming_expected_and_received(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


def test_each_gate_alone_returns_its_attention():
    x = torch.randn(2, 16, 5, 4)
    y, m_c = ChannelGate(16, reduction=4)(x, return_attention=True)
    assert m_c.shape == (2, 16, 1, 1) and torch.equal(y, x * m_c)
    y, m_s = SpatialGate()(x, return_attention=True)
    assert m_s.shape == (2, 1, 5, 4) and torch.equal(y, x * m_s)


def test_invariances_of_the_two_gates():
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    # The channel gate pools over pixels: shuffling pixels shuffles its output.
    channel_gate = ChannelGate(16, reduction=4).double()
    perm = torch.randperm(15)
    shuffle = lambda t: t.flatten(2)[:, :, perm].view_as(t)  # noqa: E731
    torch.testing.assert_close(channel_gate(shuffle(x)), shuffle(channel_gate(x)))
    # The spatial gate pools over channels (mean and max): shuffling channels shuffles its output.
    spatial_gate = SpatialGate().double()
    cperm = torch.randperm(16)
    torch.testing.assert_close(spatial_gate(x[:, cperm]), spatial_gate(x)[:, cperm])


@pytest.mark.parametrize("spatial_bn", [False, True])
def test_gradients_reach_every_parameter(spatial_bn):
    cbam = CBAM(16, reduction=4, spatial_bn=spatial_bn)
    if spatial_bn:
        _randomise_spatial_bn(cbam)  # a zero BN weight would block the conv's gradient
    x = torch.randn(4, 16, 4, 4, requires_grad=True)
    cbam(x).square().sum().backward()
    for name, p in cbam.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("spatial_bn", [False, True])
def test_gradcheck_float64(spatial_bn):
    cbam = CBAM(4, reduction=2, kernel_size=3, spatial_bn=spatial_bn).double().eval()
    if spatial_bn:
        _randomise_spatial_bn(cbam)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cbam(t), (x,))


@pytest.mark.parametrize("spatial_bn", [False, True])
def test_bf16_autocast_is_finite_and_close_to_float32(spatial_bn):
    cbam = CBAM(32, spatial_bn=spatial_bn).eval()
    if spatial_bn:
        _randomise_spatial_bn(cbam)
    x = torch.randn(2, 32, 6, 6)
    y32 = cbam(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, att = cbam(x, return_attention=True)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=3e-2)


def test_channels_last_matches_contiguous():
    cbam = CBAM(32)
    x = torch.randn(2, 32, 6, 5)
    torch.testing.assert_close(cbam(x.to(memory_format=torch.channels_last)), cbam(x))


@pytest.mark.parametrize("spatial_bn", [False, True])
def test_batch_of_one_in_eval_mode_and_float64(spatial_bn):
    cbam = CBAM(32, spatial_bn=spatial_bn).eval()
    y, att = cbam(torch.randn(1, 32, 1, 1), return_attention=True)
    assert y.shape == (1, 32, 1, 1) and att["spatial"].shape == (1, 1, 1, 1)
    assert cbam.double()(torch.randn(1, 32, 3, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("train", [True, False])
def test_matches_timm_cbammodule_with_the_same_weights(train):
    # timm's CbamModule: no MLP bias, BatchNorm after the spatial conv, [mean; max] order.
    pytest.importorskip("timm")
    from timm.layers.cbam import CbamModule  # not re-exported by timm.layers

    cbam = CBAM(64, bias=False, spatial_bn=True, pool_order="mean_max")
    _randomise_spatial_bn(cbam)
    ref = CbamModule(64, rd_channels=cbam.channel_gate.hidden, mlp_bias=False)
    with torch.no_grad():
        ref.channel.fc1.weight.copy_(cbam.channel_gate.mlp[0].weight[:, :, None, None])
        ref.channel.fc2.weight.copy_(cbam.channel_gate.mlp[2].weight[:, :, None, None])
        ref.spatial.conv.conv.weight.copy_(cbam.spatial_gate.conv.weight)
    ours_bn, timm_bn = cbam.spatial_gate.bn, ref.spatial.conv.bn
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(timm_bn, name).data.copy_(getattr(ours_bn, name))
    cbam.train(train)
    ref.train(train)
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(cbam(x), ref(x))
