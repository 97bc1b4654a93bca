"""Triple attention (A3Net): the three modules against the equations, and the DenseNet around them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn_lib.models import build_model
from attn_lib.models.densenet import DenseNet, densenet121
from attn_lib.modules.se import SqueezeExcitation
from attn_lib.modules.triple import ChannelWiseAttention, ElementWiseAttention, ScaleWiseAttention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine is small and shared: one intra-op thread is several times faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_triple(num_classes: int = 5, **kwargs) -> DenseNet:
    """The DenseNet design at toy size: widths 16-32, two layers per block, f_att width 16."""
    options = dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, hidden=16, reduction=4)
    options.update(kwargs)
    return densenet121(num_classes, attention="triple", **options)


def perturb_zero_init(model: torch.nn.Module) -> None:
    """ScaleWiseAttention's last layer starts at zero (uniform weights); make it non-zero."""
    for m in model.modules():
        if isinstance(m, ScaleWiseAttention):
            with torch.no_grad():
                m.fc2.weight.normal_(0, 0.5)
                m.fc2.bias.normal_(0, 0.5)


def randomise_batch_norm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)


# ---------------------------------------------------------------------------------------------
# Naive references, written from the equations with explicit sums.
# ---------------------------------------------------------------------------------------------

def naive_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """out[b, o, i, j] = bias[o] + sum_{c, u, v} weight[o, c, u, v] * x_pad[b, c, i + u, j + v]."""
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    x_pad = F.pad(x, (padding, padding, padding, padding))
    out = bias.view(1, -1, 1, 1).expand(batch, out_channels, height, width).clone()
    for u in range(kh):
        for v in range(kw):
            window = x_pad[:, :, u:u + height, v:v + width]
            out += torch.einsum("oc,bcij->boij", weight[:, :, u, v], window)
    return out


def naive_element_wise(module: ElementWiseAttention, x: torch.Tensor):
    """Eqs. 4-5 and the pooled product, position by position."""
    h1 = naive_conv2d(x, module.conv1.weight, module.conv1.bias, 0).clamp_min(0)
    h2 = naive_conv2d(h1, module.conv2.weight, module.conv2.bias, 1).clamp_min(0)
    z = naive_conv2d(h2, module.conv3.weight, module.conv3.bias, 0)
    batch, classes, height, width = z.shape
    attention = torch.empty_like(z)
    scores = naive_conv2d(x, module.classifier.weight, module.classifier.bias, 0)
    score_vector = torch.zeros(batch, classes, dtype=x.dtype)
    for b in range(batch):
        for k in range(classes):
            total = sum(torch.exp(z[b, k, i, j]) for i in range(height) for j in range(width))
            for i in range(height):
                for j in range(width):
                    attention[b, k, i, j] = torch.exp(z[b, k, i, j]) / total
                    score_vector[b, k] += attention[b, k, i, j] * scores[b, k, i, j]
    return score_vector, attention, scores


def naive_scale_wise(module: ScaleWiseAttention, features: list[torch.Tensor]):
    """The reconstructed scale-wise attention in eval mode (BN with its running statistics)."""
    height, width = features[-1].shape[2:]
    projected = []
    for proj, x in zip(module.projections, features):
        conv, bn = proj[0], proj[1]
        fh, fw = x.shape[2] // height, x.shape[3] // width
        pooled = x.unflatten(2, (height, fh)).unflatten(4, (width, fw)).mean(dim=(3, 5))
        u = torch.einsum("oc,bcij->boij", conv.weight[:, :, 0, 0], pooled)
        u = (u - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        projected.append((u * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).clamp_min(0))
    descriptor = sum(projected).mean(dim=(2, 3))
    z = (descriptor @ module.fc1.weight.T + module.fc1.bias).clamp_min(0)
    e = z @ module.fc2.weight.T + module.fc2.bias
    a = torch.exp(e) / torch.exp(e).sum(dim=1, keepdim=True)
    y = sum(a[:, s, None, None, None] * projected[s] for s in range(len(projected)))
    return y, a


# ---------------------------------------------------------------------------------------------
# ElementWiseAttention
# ---------------------------------------------------------------------------------------------

def test_element_wise_matches_naive_reference_float64():
    torch.manual_seed(0)
    module = ElementWiseAttention(6, 3, hidden=5).double()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    y, attn = module(x, return_attention=True)
    y_ref, a_ref, s_ref = naive_element_wise(module, x)
    assert y.shape == (2, 3) and attn["element"].shape == attn["scores"].shape == (2, 3, 4, 3)
    torch.testing.assert_close(attn["element"], a_ref)
    torch.testing.assert_close(attn["scores"], s_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(module(x), y)


def test_element_attention_is_a_softmax_over_space_not_over_classes():
    # The seed's Keras layer normalises over the classes at each pixel; ours over the positions.
    torch.manual_seed(1)
    module = ElementWiseAttention(8, 4, hidden=8)
    _, attn = module(torch.randn(3, 8, 6, 5), return_attention=True)
    a = attn["element"]
    assert (a > 0).all()
    torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(3, 4))
    assert (a.sum(dim=1) - 1).abs().max() > 0.1


def test_attend_then_classify_equals_classify_then_attend():
    """sum_ij A_k S_k == w_k . (sum_ij A_k X) + b_k: holds because each A_k sums to 1 over space."""
    torch.manual_seed(2)
    module = ElementWiseAttention(6, 3, hidden=4).double()
    with torch.no_grad():
        module.classifier.bias.normal_(0, 2.0)  # a visible bias, so the normalisation matters
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    y, attn = module(x, return_attention=True)
    w, b = module.classifier.weight[:, :, 0, 0], module.classifier.bias

    def attend_then_classify(a):
        pooled = torch.einsum("bkij,bcij->bkc", a, x)  # one attended descriptor per class
        return torch.einsum("bkc,kc->bk", pooled, w) + b

    torch.testing.assert_close(attend_then_classify(attn["element"]), y)
    # The negative control: a softmax over the classes at each pixel breaks the identity.
    per_pixel = torch.softmax(module.attention_logits(x), dim=1)
    wrong = (per_pixel * attn["scores"]).sum(dim=(2, 3))
    assert (attend_then_classify(per_pixel) - wrong).abs().max() > 1e-3


def test_element_wise_structure_follows_the_paper():
    module = ElementWiseAttention(1024, 10)
    assert module.hidden == 512
    assert [c.kernel_size for c in (module.conv1, module.conv2, module.conv3)] == [(1, 1), (3, 3), (1, 1)]
    assert module.conv3.out_channels == module.classifier.out_channels == 10
    assert module.classifier.kernel_size == (1, 1)
    expected = 512 * 1024 + 9 * 512 * 512 + 512 * 10 + 1024 * 10 + (512 + 512 + 10 + 10)
    assert sum(p.numel() for p in module.parameters()) == expected == 2_899_988


def test_element_wise_gradcheck():
    torch.manual_seed(3)
    module = ElementWiseAttention(3, 2, hidden=4).double()
    x = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t), (x,))
    assert torch.autograd.gradcheck(lambda t: module(t, return_attention=True)[1]["element"], (x,))


def test_element_wise_bf16_autocast_channels_last_batch1():
    torch.manual_seed(4)
    module = ElementWiseAttention(16, 4, hidden=16).eval()
    x = torch.randn(2, 16, 6, 6)
    y = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, attn = module(x, return_attention=True)
    assert attn["element"].dtype == torch.float32  # softmax statistics kept in float32
    assert torch.isfinite(y_bf16).all()
    torch.testing.assert_close(y_bf16.float(), y, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(module(x.to(memory_format=torch.channels_last)), y)
    torch.testing.assert_close(module(x[:1]), y[:1])


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 5, 4, 4), r"expected 6 channels.*got 5"),
        (torch.randn(2, 6, 4), r"expected a \[B, C, H, W\] tensor, got shape \[2, 6, 4\]"),
        (torch.ones(2, 6, 4, 4, dtype=torch.long), r"expected a floating-point tensor, got torch.int64"),
    ],
)
def test_element_wise_rejects_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        ElementWiseAttention(6, 3, hidden=4)(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=0, num_classes=3), r"expected channels to be a positive integer, got 0"),
        (dict(channels=6, num_classes=0), r"expected num_classes to be a positive integer, got 0"),
        (dict(channels=6, num_classes=3, hidden=2.5), r"expected hidden to be a positive integer, got 2.5"),
    ],
)
def test_element_wise_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElementWiseAttention(**kwargs)


# ---------------------------------------------------------------------------------------------
# ChannelWiseAttention
# ---------------------------------------------------------------------------------------------

def test_channel_wise_is_the_se_gate():
    torch.manual_seed(5)
    module = ChannelWiseAttention(32, reduction=4)
    assert isinstance(module, SqueezeExcitation)  # reused, not written again
    x = torch.randn(2, 32, 3, 3)
    y, s = module(x, return_attention=True)
    assert s.shape == (2, 32, 1, 1) and ((s > 0) & (s < 1)).all()
    torch.testing.assert_close(y, x * s)
    se = SqueezeExcitation(32, reduction=4)
    se.load_state_dict(module.state_dict())
    torch.testing.assert_close(se(x), y)
    with pytest.raises(ValueError, match=r"ChannelWiseAttention: reduction 64 leaves"):
        ChannelWiseAttention(32, reduction=64)


# ---------------------------------------------------------------------------------------------
# ScaleWiseAttention
# ---------------------------------------------------------------------------------------------

def scale_inputs(dtype=torch.float32, batch=2):
    return [torch.randn(batch, 3, 8, 8, dtype=dtype), torch.randn(batch, 5, 4, 4, dtype=dtype),
            torch.randn(batch, 6, 2, 2, dtype=dtype)]


def test_scale_wise_matches_naive_reference_float64():
    torch.manual_seed(6)
    module = ScaleWiseAttention(6, in_channels=(3, 5, 6), reduction=2).double().eval()
    perturb_zero_init(module)
    randomise_batch_norm(module)
    features = scale_inputs(torch.float64)
    y, a = module(features, return_attention=True)
    y_ref, a_ref = naive_scale_wise(module, features)
    assert y.shape == (2, 6, 2, 2) and a.shape == (2, 3)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, dtype=torch.float64))
    assert (a - 1 / 3).abs().max() > 1e-2  # the perturbed weights are not uniform any more


def test_scale_wise_starts_as_the_plain_average():
    torch.manual_seed(7)
    module = ScaleWiseAttention(6, in_channels=(3, 5, 6), reduction=2).eval()
    features = scale_inputs()
    y, a = module(features, return_attention=True)
    torch.testing.assert_close(a, torch.full((2, 3), 1 / 3))
    projected = [p(F.adaptive_avg_pool2d(x, (2, 2))) for p, x in zip(module.projections, features)]
    torch.testing.assert_close(y, sum(projected) / 3)


def test_scale_wise_gradcheck():
    torch.manual_seed(8)
    module = ScaleWiseAttention(4, in_channels=(3, 4), reduction=2).double()
    perturb_zero_init(module)
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: module([a, b]), (x1, x2))


def test_scale_wise_bf16_autocast_and_channels_last():
    torch.manual_seed(9)
    module = ScaleWiseAttention(6, in_channels=(3, 5, 6), reduction=2).eval()
    perturb_zero_init(module)
    features = scale_inputs()
    y, a = module(features, return_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, a_bf16 = module(features, return_attention=True)
    assert a_bf16.dtype == torch.float32 and torch.isfinite(y_bf16).all()
    torch.testing.assert_close(y_bf16.float(), y, atol=5e-2, rtol=5e-2)
    y_cl = module([f.to(memory_format=torch.channels_last) for f in features])
    torch.testing.assert_close(y_cl, y)


@pytest.mark.parametrize(
    "features, match",
    [
        (lambda f: f[:2], r"expected a list of 3 feature maps, got 2 items"),
        (lambda f: f[0], r"expected a list of 3 feature maps, got Tensor"),
        (lambda f: [torch.randn(2, 4, 8, 8)] + f[1:], r"\(scale 0\): expected 3 channels \(dim 1\), got 4"),
        (lambda f: [f[0], torch.randn(2, 5, 1, 1), f[2]], r"\(scale 1\): expected batch 2 and a spatial size of at least \[2, 2\]"),
        (lambda f: [torch.randn(3, 3, 8, 8)] + f[1:], r"\(scale 0\): expected batch 2 .* got shape \[3, 3, 8, 8\]"),
    ],
)
def test_scale_wise_rejects_bad_input(features, match):
    module = ScaleWiseAttention(6, in_channels=(3, 5, 6), reduction=2)
    with pytest.raises(ValueError, match=match):
        module(features(scale_inputs()))


def test_scale_wise_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"expected in_channels to be a non-empty sequence"):
        ScaleWiseAttention(6, in_channels=())
    with pytest.raises(ValueError, match=r"expected every entry of in_channels to be a positive integer, got 0"):
        ScaleWiseAttention(6, in_channels=(3, 0))
    with pytest.raises(ValueError, match=r"reduction 16 leaves 6 // 16 = 0 hidden channels"):
        ScaleWiseAttention(6, in_channels=(3, 6))


# ---------------------------------------------------------------------------------------------
# DenseNet-121
# ---------------------------------------------------------------------------------------------

def test_densenet121_parameter_count():
    plain = densenet121(10)
    assert sum(p.numel() for p in plain.parameters()) == 6_956_298
    assert plain.block_channels == (256, 512, 1024, 1024) and plain.num_features == 1024
    assert plain.auxiliary_loss_weight == 0.0
    triple = densenet121(10, attention="triple")
    added = sum(sum(p.numel() for p in m.parameters())
                for m in (triple.channel_attention, triple.element_attention, triple.scale_attention))
    assert sum(p.numel() for p in triple.parameters()) == 6_956_298 + added == 12_681_825
    assert triple.auxiliary_loss_weight == 1.0 and triple.element_attention.hidden == 512
    assert triple.scale_attention.in_channels == (512, 1024, 1024)


def test_densenet121_triple_outputs_and_attention():
    torch.manual_seed(10)
    model = densenet121(10, attention="triple").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, aux, attn = model(x, return_aux=True, return_attention=True)
        plain_logits = model(x)
        logits_a, aux_a = model(x, return_aux=True)
        logits_b, attn_b = model(x, return_attention=True)
    assert logits.shape == aux.shape == (2, 10)
    assert attn["channel"].shape == (2, 1024, 1, 1)
    assert attn["element"].shape == attn["scores"].shape == (2, 10, 2, 2)
    assert attn["scale"].shape == (2, 3)
    for other in (plain_logits, logits_a, logits_b):
        torch.testing.assert_close(other, logits)
    torch.testing.assert_close(aux_a, aux)
    torch.testing.assert_close(attn_b["scale"], attn["scale"])
    assert ((attn["channel"] > 0) & (attn["channel"] < 1)).all()
    torch.testing.assert_close(attn["element"].sum(dim=(2, 3)), torch.ones(2, 10))
    torch.testing.assert_close(attn["scale"].sum(dim=1), torch.ones(2))
    torch.testing.assert_close((attn["element"] * attn["scores"]).sum(dim=(2, 3)), aux)


def test_element_branch_reads_the_channel_attended_features():
    # The seed gated the attention estimator's output; here f_att reads X_CA = X * s.
    torch.manual_seed(11)
    model = small_triple().eval()
    seen = {}
    model.element_attention.register_forward_hook(lambda m, args, out: seen.update(x_ca=args[0]))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, _, attn = model(x, return_aux=True, return_attention=True)
        features, _ = model.features(x)
    torch.testing.assert_close(seen["x_ca"], features * attn["channel"])


def test_aux_loss_trains_the_element_branch_and_the_backbone_main_loss_does_not_reach_it():
    torch.manual_seed(12)
    model = small_triple()
    perturb_zero_init(model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    logits, aux = model(x, return_aux=True)
    names, params = zip(*model.named_parameters())
    main = dict(zip(names, torch.autograd.grad(F.cross_entropy(logits, y), params,
                                               retain_graph=True, allow_unused=True)))
    side = dict(zip(names, torch.autograd.grad(F.cross_entropy(aux, y), params, allow_unused=True)))
    element = {n for n in names if n.startswith("element_attention.")}
    assert element
    assert all(main[n] is None for n in element)  # a side branch: the logits do not use it
    for name, grad in side.items():
        if name.startswith(("element_attention.", "channel_attention.", "stem.", "blocks.0.")):
            assert grad is not None and grad.abs().sum() > 0, name


def test_gradients_reach_every_parameter():
    torch.manual_seed(13)
    model = small_triple()
    perturb_zero_init(model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    logits, aux = model(x, return_aux=True)
    loss = F.cross_entropy(logits, y) + model.auxiliary_loss_weight * F.cross_entropy(aux, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_falls_with_the_auxiliary_loss():
    torch.manual_seed(14)
    model = small_triple(aux_weight=0.5)
    assert model.auxiliary_loss_weight == 0.5
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        logits, aux = model(x, return_aux=True)
        loss = F.cross_entropy(logits, y) + model.auxiliary_loss_weight * F.cross_entropy(aux, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_model_dtypes_layouts_and_batch1():
    torch.manual_seed(15)
    model = small_triple().eval()
    perturb_zero_init(model)
    randomise_batch_norm(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, aux = model(x, return_aux=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_bf16, aux_bf16, attn = model(x, return_aux=True, return_attention=True)
        logits_cl, aux_cl = model(x.to(memory_format=torch.channels_last), return_aux=True)
        logits_1 = model(x[:1])
        logits_64, aux_64 = model.double()(x.double(), return_aux=True)
    assert torch.isfinite(logits_bf16).all() and torch.isfinite(aux_bf16).all()
    assert attn["element"].dtype == attn["scale"].dtype == torch.float32
    torch.testing.assert_close(logits_bf16.float(), logits, atol=0.1, rtol=0.1)
    torch.testing.assert_close(aux_bf16.float(), aux, atol=0.1, rtol=0.1)
    torch.testing.assert_close(logits_cl, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux_cl, aux, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_1, logits[:1], atol=1e-5, rtol=1e-5)
    assert logits_64.dtype == aux_64.dtype == torch.float64
    torch.testing.assert_close(logits_64.float(), logits, atol=1e-4, rtol=1e-4)


def test_build_model_and_scale_blocks():
    model = build_model("densenet121", 5, attention="triple", growth_rate=8, block_config=(2, 2, 2, 2),
                        num_init_features=16, hidden=16, reduction=4, scale_blocks=(1, 3, 4))
    assert isinstance(model, DenseNet) and model.scale_attention.in_channels == (32, 32, 32)
    with torch.no_grad():
        _, attn = model.eval()(torch.randn(1, 3, 16, 16), return_attention=True)
    assert attn["scale"].shape == (1, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention="se"), r"unknown attention 'se'; expected None or one of triple"),
        (dict(attention=None, hidden=16), r"triple-attention options \['hidden'\] given without attention='triple'"),
        (dict(attention=None, aux_weight=0.5), r"options \['aux_weight'\] given without"),
        (dict(attention="triple", aux_weight=0.0), r"expected aux_weight > 0 with triple attention, got 0.0"),
        (dict(attention="triple", scale_blocks=(2, 3)), r"ending with the last block 4, got \(2, 3\)"),
        (dict(attention="triple", scale_blocks=(3, 2, 4)), r"expected scale_blocks to be increasing"),
        (dict(block_config=()), r"expected block_config to be a non-empty sequence"),
        (dict(compression=1.5), r"expected compression in \(0, 1\], got 1.5"),
        (dict(growth_rate=0), r"expected growth_rate to be a positive integer, got 0"),
    ],
)
def test_densenet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        densenet121(10, **kwargs)


def test_densenet_rejects_bad_calls():
    plain = densenet121(10, growth_rate=8, block_config=(1, 1), num_init_features=8)
    with pytest.raises(ValueError, match=r"return_aux / return_attention expected attention='triple'"):
        plain(torch.randn(1, 3, 8, 8), return_aux=True)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\], got \[1, 1, 8, 8\]"):
        plain(torch.randn(1, 1, 8, 8))


def test_densenet121_width_scales_like_the_resnets():
    standard = densenet121(10)
    assert (standard.blocks[0].layers[0].conv2.out_channels, standard.stem.out_channels) == (32, 64)
    assert sum(p.numel() for p in densenet121(10, width=64).parameters()) == \
        sum(p.numel() for p in standard.parameters())
    narrow = densenet121(10, width=8, block_config=(1, 1))
    reference = densenet121(10, growth_rate=4, num_init_features=8, block_config=(1, 1))
    assert narrow.stem.out_channels == 8 and narrow.num_features == reference.num_features
    assert sum(p.numel() for p in narrow.parameters()) == sum(p.numel() for p in reference.parameters())
    built = build_model("densenet121", 10, "triple", width=8, block_config=(1, 1), hidden=8,
                        reduction=2, scale_reduction=2)
    assert built.num_features == reference.num_features
    with pytest.raises(ValueError, match="either width or growth_rate"):
        densenet121(10, width=8, growth_rate=4)
    with pytest.raises(ValueError, match="width to be an integer >= 2"):
        densenet121(10, width=1)


def test_each_part_alone_and_the_sum_of_their_parameters():
    full = small_triple()
    plain = densenet121(5, growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    added = {}
    x = torch.randn(2, 3, 32, 32)
    for part in ("channel", "element", "scale"):
        model = small_triple(parts=[part])
        assert model.parts == (part,)
        added[part] = count(model) - count(plain)
        logits, attention = model.eval()(x, return_attention=True)
        assert logits.shape == (2, 5)
        assert [k for k, v in attention.items() if v is not None] == \
            {"channel": ["channel"], "element": ["element", "scores"], "scale": ["scale"]}[part]
        assert (model.auxiliary_loss_weight > 0) == (part == "element")
    assert sum(added.values()) == count(full) - count(plain)
    with pytest.raises(ValueError, match="return_aux expected the element-wise part"):
        small_triple(parts=["channel"])(x, return_aux=True)
    for bad in (["spatial"], [], "channel", ["scale", "scale"]):
        with pytest.raises(ValueError, match="expected parts"):
            small_triple(parts=bad)
    with pytest.raises(ValueError, match="without attention='triple'"):
        densenet121(5, parts=["channel"])


def test_bench_densenet_rows_at_toy_size():
    from attn_lib.bench_densenet import VARIANTS, bench_densenet, build_variant

    kwargs = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, hidden=8, reduction=2,
                  scale_reduction=2)
    result = bench_densenet("cpu", batch=2, rounds=1, **kwargs)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == list(VARIANTS) and result["model_kwargs"] == kwargs
    plain = densenet121(10, growth_rate=4, block_config=(1, 1), num_init_features=8)
    assert rows["none"]["params"] == sum(p.numel() for p in plain.parameters())
    added = {n: rows[n]["params"] - rows["none"]["params"] for n in rows}
    assert added["triple"] == added["channel"] + added["element"] + added["scale"] > 0
    assert rows["element"]["flops"] > rows["none"]["flops"] and rows["none"]["step_time_ratio"] == 1.0
    assert all(r["step_seconds"] > 0 for r in rows.values())
    with pytest.raises(ValueError, match="unknown variant"):
        build_variant("spatial")
