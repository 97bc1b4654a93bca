"""The contract of MECHANISMS.md, checked the same way for every feature-map module."""
import pytest
import torch

import attn_lib
from attn_lib.registry import attention_spec

FEATURE_MAP_MODULES = ["se", "eca", "sk", "cbam", "danet", "nonlocal"]
C, H, W = 32, 6, 6


def build(name, **kw):
    torch.manual_seed(0)
    kw = {"groups": 1, **kw} if name == "sk" else kw
    m = attn_lib.create_attention(name, C, **kw)
    # start away from the identity so that every check below sees the attention at work
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if (p == 0).all():
                p.copy_(torch.randn_like(p) * 0.5)
    return m.eval()


def test_registry_names_and_placements():
    assert set(FEATURE_MAP_MODULES) | {"dia"} == set(attn_lib.available_attentions())
    assert {n: attention_spec(n).placement for n in FEATURE_MAP_MODULES} == {
        "se": "gate", "eca": "gate", "cbam": "gate", "sk": "conv", "danet": "stage", "nonlocal": "stage"}


@pytest.mark.parametrize("name", FEATURE_MAP_MODULES)
def test_shape_is_kept_and_attention_is_what_was_applied(name):
    m = build(name)
    x = torch.randn(2, C, H, W)
    y = m(x)
    assert y.shape == x.shape
    y2, att = m(x, return_attention=True)
    torch.testing.assert_close(y, y2)
    if name in ("se", "eca"):
        assert att.shape == (2, C, 1, 1) and ((att > 0) & (att < 1)).all()
        torch.testing.assert_close(y, x * att)
    elif name == "cbam":
        assert att["channel"].shape == (2, C, 1, 1) and att["spatial"].shape == (2, 1, H, W)
        torch.testing.assert_close(y, (x * att["channel"]) * att["spatial"])
    elif name == "sk":
        assert att.shape == (2, 2, C, 1, 1)
        torch.testing.assert_close(att.sum(1), torch.ones(2, C, 1, 1))
    elif name == "danet":
        assert att["position"].shape == (2, H * W, H * W) and att["channel"].shape == (2, C, C)
        for a in att.values():
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    elif name == "nonlocal":
        assert att.shape == (2, H * W, (H // 2) * (W // 2))
        torch.testing.assert_close(att.sum(-1), torch.ones(2, H * W))


@pytest.mark.parametrize("name", FEATURE_MAP_MODULES)
def test_wrong_channels_and_dims_are_named(name):
    m = build(name)
    with pytest.raises(ValueError, match=rf"expected {C} channels.*got {C + 1}"):
        m(torch.randn(2, C + 1, H, W))
    with pytest.raises(ValueError, match=r"expected .*\[B, C, H, W\].*got shape \[2, 32, 6\]"):
        m(torch.randn(2, C, H))


@pytest.mark.parametrize("name", ["se", "cbam", "danet"])
def test_a_reduction_that_leaves_zero_channels_is_an_error(name):
    with pytest.raises(ValueError, match="0 hidden channels|leaves"):
        attn_lib.create_attention(name, 4, reduction=16 if name != "danet" else 8)


@pytest.mark.parametrize("name", FEATURE_MAP_MODULES)
def test_float64_channels_last_and_batch_one(name):
    m = build(name)
    x = torch.randn(3, C, H, W)
    y = m(x)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), y)
    torch.testing.assert_close(m(x[1:2]), y[1:2])  # batch 1 in eval mode
    m64 = m.double()
    y64 = m64(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FEATURE_MAP_MODULES)
def test_bf16_autocast_is_finite_and_close(name):
    m = build(name)
    x = torch.randn(2, C, H, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name", FEATURE_MAP_MODULES)
def test_traces_under_torch_compile_without_graph_breaks(name):
    torch._dynamo.reset()
    m = build(name)
    x = torch.randn(2, C, H, W)
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize("name", FEATURE_MAP_MODULES)
def test_gradients_reach_every_parameter(name):
    m = build(name).train()
    m(torch.randn(2, C, H, W)).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
