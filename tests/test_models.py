import pytest
import torch

import attn_lib
from attn_lib.models import BasicBlock, build_model, resnet18, resnet34


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_resnet18_has_the_published_parameter_count():
    assert n_params(resnet18(num_classes=10)) == 11_173_962


def test_resnet34_parameter_count_and_shape():
    m = resnet34(num_classes=100)
    assert n_params(m) == 21_328_292
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_cifar_stem_keeps_resolution_and_stages_halve_it():
    m = resnet18(10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert m.stem(x).shape == (1, 64, 32, 32)
    assert m.features(x).shape == (1, 512, 4, 4)


def test_stride_two_block_of_equal_width_gets_a_projection_shortcut():
    # the seed's BasicBlock only projected when the widths differed, so this case broke
    block = BasicBlock(64, 64, stride=2)
    assert block(torch.randn(2, 64, 8, 8)).shape == (2, 64, 4, 4)


def test_forward_parts_are_branch_and_shortcut():
    block = BasicBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    branch, shortcut = block.forward_parts(x)
    torch.testing.assert_close(block(x), torch.relu(branch + shortcut))


def test_unknown_attention_lists_the_valid_names():
    with pytest.raises(ValueError, match="expected one of cbam, danet, dia, eca, nonlocal, se, sk"):
        resnet18(10, attention="transformer")
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        attn_lib.create_attention("nope", 64)


def test_registry_is_lower_case_and_complete():
    assert attn_lib.available_attentions() == ["cbam", "danet", "dia", "eca", "nonlocal", "se", "sk"]


def test_attention_options_without_attention_are_an_error():
    with pytest.raises(ValueError, match="without an attention"):
        resnet18(10, reduction=8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(bad)


def test_bad_images_are_named():
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\], got \[2, 1, 32, 32\]"):
        resnet18(10)(torch.randn(2, 1, 32, 32))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="expected one of resnet18, resnet34, densenet121"):
        build_model("vgg", 10)


@pytest.mark.parametrize("name", ["se", "eca", "cbam"])
def test_gates_sit_on_the_branch_before_the_addition(name):
    m = resnet18(10, attention=name)
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    assert len(blocks) == 8
    assert all(type(b.gate).__name__ == type(attn_lib.create_attention(name, 64)).__name__ for b in blocks)
    # the gate sees the branch, not the sum: with the gate forced to zero the block is relu(shortcut)
    block = blocks[1].eval()
    x = torch.randn(2, 64, 8, 8)
    block.gate.forward = lambda t, **kw: torch.zeros_like(t)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_sk_replaces_the_second_convolution():
    m = resnet18(10, attention="sk")
    assert type(m.layer2[0].conv2).__name__ == "SelectiveKernel"
    assert isinstance(m.layer2[0].gate, torch.nn.Identity)


@pytest.mark.parametrize("name", ["nonlocal", "danet"])
def test_stage_modules_sit_after_stage_three_by_default(name):
    m = resnet18(10, attention=name)
    assert isinstance(m.layer3, torch.nn.Sequential) and type(m.layer3[-1]).__name__ == \
        type(attn_lib.create_attention(name, 256)).__name__
    m2 = resnet18(10, attention=name, attention_stages=(2, 3))
    assert type(m2.layer2[-1]).__name__ == type(m.layer3[-1]).__name__
    with pytest.raises(ValueError, match="attention_stages"):
        resnet18(10, attention=name, attention_stages=(5,))


@pytest.mark.parametrize("name", ["se", "eca", "cbam", "sk", "nonlocal", "danet", "dia"])
def test_every_mechanism_trains_in_resnet18(name):
    torch.manual_seed(0)
    m = resnet18(10, attention=name, width=16)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
