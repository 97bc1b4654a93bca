"""The triple-attention chapter's checkers pass correct answers and name the mistakes in wrong ones."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_lib.exercises.triple import check_element_wise, check_shapes, check_training_step
from attn_lib.modules.triple import ElementWiseAttention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- element-wise module
class Element(nn.Module):
    """A correct element-wise attention, with its own layer names; `mistake` breaks one thing."""

    mistake = None

    def __init__(self, channels, num_classes, hidden=512):
        super().__init__()
        self.classify = nn.Conv2d(channels, num_classes, 1)  # registered first on purpose
        self.f_att = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                                   nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, num_classes, 1))

    def forward(self, x):
        z = self.f_att(x)
        a = torch.softmax(z, dim=1) if self.mistake == "classes" else \
            torch.softmax(z.flatten(2), dim=-1).view_as(z)
        s = self.classify(x)
        if self.mistake == "keras":
            s = torch.sigmoid(s)
        pooled = (a * s).mean(dim=(2, 3)) if self.mistake == "mean" else (a * s).sum(dim=(2, 3))
        return pooled, {"A": a, "S": s}


def wrong(kind):
    return type(f"Element_{kind}", (Element,), {"mistake": kind})


@pytest.mark.parametrize("cls", [Element, ElementWiseAttention])
def test_correct_element_wise_passes(cls):
    report = check_element_wise(cls)
    assert report.passed, str(report)


@pytest.mark.parametrize("kind, words", [("classes", "over the K classes"), ("keras", "sigmoid"),
                                         ("mean", "averaged")])
def test_wrong_element_wise_is_named(kind, words):
    report = check_element_wise(wrong(kind))
    assert not report.passed
    assert words in str(report), str(report)


def test_missing_layer_and_stub_are_reported():
    class NoThreeByThree(nn.Module):
        def __init__(self, channels, num_classes, hidden):
            super().__init__()
            self.a = nn.Conv2d(channels, hidden, 1)
            self.b = nn.Conv2d(hidden, num_classes, 1)
            self.c = nn.Conv2d(channels, num_classes, 1)

    report = check_element_wise(NoThreeByThree)
    assert not report.passed and "no 3x3 Conv2d" in str(report)

    class Stub(nn.Module):
        def __init__(self, *args):
            super().__init__()
            raise NotImplementedError("build f_att")

    report = check_element_wise(Stub)
    assert not report.passed and "not implemented yet" in str(report)


# ----------------------------------------------------------------------------- training step
def good_step(model, images, labels, optimizer, aux_weight):
    logits, aux = model(images, return_aux=True)
    loss = F.cross_entropy(logits, labels) + aux_weight * F.cross_entropy(aux, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def main_only_step(model, images, labels, optimizer, aux_weight):
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def unweighted_step(model, images, labels, optimizer, aux_weight):
    return good_step(model, images, labels, optimizer, 1.0)


def no_zero_grad_step(model, images, labels, optimizer, aux_weight):
    logits, aux = model(images, return_aux=True)
    loss = F.cross_entropy(logits, labels) + aux_weight * F.cross_entropy(aux, labels)
    loss.backward()
    optimizer.step()
    return loss


def test_correct_training_step_passes():
    report = check_training_step(good_step)
    assert report.passed, str(report)


@pytest.mark.parametrize("step, words", [(main_only_step, "auxiliary term"),
                                         (unweighted_step, "weight 1, not aux_weight"),
                                         (no_zero_grad_step, "zero the gradients")])
def test_wrong_training_step_is_named(step, words):
    report = check_training_step(step)
    assert not report.passed
    assert words in str(report), str(report)


# ----------------------------------------------------------------------------- shapes
def test_shapes():
    right = {"X_CA": (8, 1024, 4, 4), "A": (8, 10, 4, 4), "S": (8, 10, 4, 4), "score": (8, 10)}
    report = check_shapes(right)
    assert report.passed, str(report)
    report = check_shapes({**right, "A": (8, 10, 32, 32), "score": [8, 10]})
    assert not report.passed and "expected [8, 10, 4, 4], got [8, 10, 32, 32]" in str(report)
    assert not check_shapes({"A": (1, 2)}).passed
    assert "tuple of ints" in str(check_shapes({**right, "S": "8x10"}))
    assert check_shapes(lambda: right).passed


def test_shapes_stub_is_reported():
    def stub():
        raise NotImplementedError("return the four shapes")

    report = check_shapes(stub)
    assert not report.passed and "not implemented yet" in str(report)
