"""Checkers for the exercises of the triple-attention chapter (``notebooks/08_triple``).

    from attn_lib.exercises import triple
    report = triple.check_element_wise(MyElementWise)      # the element-wise attention module
    report = triple.check_training_step(training_step)    # a step with the auxiliary loss
    report = triple.check_shapes(answer)                  # predicted shapes of A, S and the scores

:func:`check_element_wise` finds the student's four convolutions by their shapes, copies the
weights of :class:`attn_lib.modules.triple.ElementWiseAttention` into them and compares the score
vectors; when they differ it recomputes the reference with the usual mistakes (a softmax over the
classes instead of over the positions, a sigmoid, a mean or a max instead of the sum, the sigmoid
gate of the circulating Keras attempt, ...) and names the one the student's output matches.
:func:`check_training_step` runs the student's step and a reference step on two copies of a small
triple-attention DenseNet and compares the returned loss and the updated weights.
:func:`check_shapes` compares predicted shapes with those a real DenseNet-121 produces. Each
returns a :class:`~attn_lib.exercises.report.Report` and never raises because the answer is wrong.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.densenet import DenseNet, densenet121
from ..modules.triple import ElementWiseAttention
from .report import Report, compare

__all__ = ["check_element_wise", "check_training_step", "check_shapes", "small_triple_densenet"]

# Sizes chosen so that every convolution of the module has a shape of its own.
_C, _K, _HIDDEN = 12, 5, 8


# ----------------------------------------------------------------------------- element-wise
def _find_convs(module: nn.Module, channels: int, classes: int, hidden: int) -> dict[str, nn.Conv2d]:
    """The student's f_att convolutions and classifier, recognised by their shapes."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    wanted = {
        "conv1": (channels, hidden, (1, 1)),
        "conv2": (hidden, hidden, (3, 3)),
        "conv3": (hidden, classes, (1, 1)),
        "classifier": (channels, classes, (1, 1)),
    }
    found = {}
    for role, (n_in, n_out, kernel) in wanted.items():
        matches = [m for m in convs if (m.in_channels, m.out_channels, tuple(m.kernel_size)) == (n_in, n_out, kernel)]
        kind = f"{kernel[0]}x{kernel[1]} Conv2d {n_in} -> {n_out}"
        assert matches, (f"no {kind} found for {role} (with channels={channels}, num_classes={classes}, "
                         f"hidden={hidden}); your convolutions: "
                         f"{[(m.in_channels, m.out_channels, tuple(m.kernel_size)) for m in convs]}")
        assert len(matches) == 1, f"{len(matches)} layers look like {role} ({kind}); expected one"
        found[role] = matches[0]
    if tuple(found["conv2"].padding) != (1, 1):
        raise AssertionError(f"the 3x3 convolution needs padding=1 to keep H x W, got padding={found['conv2'].padding}")
    return found


def _variant(ref: ElementWiseAttention, x: torch.Tensor, mistake: str | None) -> torch.Tensor:
    """The reference score vector, or what it is with one of the usual mistakes."""
    if mistake == "no relu":
        z = ref.conv3(ref.conv2(ref.conv1(x)))
    elif mistake == "no 3x3":
        z = ref.conv3(F.relu(ref.conv1(x)))
    else:
        z = ref.attention_logits(x)
    if mistake == "softmax over classes":
        a = torch.softmax(z, dim=1)
    elif mistake == "sigmoid":
        a = torch.sigmoid(z)
    elif mistake == "no softmax":
        a = z
    else:
        a = torch.softmax(z.flatten(2), dim=-1).view_as(z)
    s = ref.classifier(x)
    if mistake == "sigmoid scores":
        s = torch.sigmoid(s)
    product = a * s
    if mistake == "mean":
        return product.mean(dim=(2, 3))
    if mistake == "max":
        return product.amax(dim=(2, 3))
    return product.sum(dim=(2, 3))


_MISTAKES = {
    "softmax over classes": "the softmax runs over the K classes at each position (dim 1); it must run over "
                            "the H*W positions of each class map, so that every map A_k sums to 1",
    "sigmoid": "a sigmoid instead of the spatial softmax: the maps A_k must sum to 1 over the positions",
    "no softmax": "no softmax on f_att's output: A must be a distribution over the positions",
    "sigmoid scores": "the score maps S pass through a sigmoid (as in the circulating Keras attempt); "
                      "S is the plain output of the 1x1 classifier",
    "mean": "the product A * S is averaged over the positions; it must be summed (A already sums to 1)",
    "max": "the product A * S is max-pooled over the positions; it must be summed",
    "no relu": "no ReLU between f_att's convolutions",
    "no 3x3": "f_att skips its 3x3 convolution",
}


def _score_vector(out) -> torch.Tensor:
    if isinstance(out, tuple):
        out = out[0]
    assert isinstance(out, torch.Tensor), f"expected forward to return the score vector (a tensor), got {type(out).__name__}"
    return out


def check_element_wise(cls: Callable[..., nn.Module], channels: int = _C, num_classes: int = _K,
                       hidden: int = _HIDDEN) -> Report:
    """Check a student's element-wise attention ``cls(channels, num_classes, hidden)``.

    Layout the checker expects: four ``nn.Conv2d`` with biases: f_att's 1x1 ``C -> hidden``, 3x3
    ``hidden -> hidden`` (padding 1) and 1x1 ``hidden -> K``, and the classifier's 1x1 ``C -> K``.
    ``forward(x)`` maps ``[B, C, H, W]`` to the score vector ``[B, K]`` (a tuple whose first
    item is the score vector is accepted too).
    """
    report = Report(f"Element-wise attention check: {getattr(cls, '__name__', cls)}"
                    f"(channels={channels}, num_classes={num_classes}, hidden={hidden})")
    state: dict = {}

    def build():
        torch.manual_seed(0)
        state["student"] = cls(channels, num_classes, hidden)
        assert isinstance(state["student"], nn.Module), f"expected an nn.Module, got {type(state['student']).__name__}"

    if not report.run("builds", build):
        return report

    def layers():
        state["convs"] = _find_convs(state["student"], channels, num_classes, hidden)
        missing = [role for role, m in state["convs"].items() if m.bias is None]
        assert not missing, f"{', '.join(missing)} without bias; the reference has biases in all four convolutions"
        return "f_att 1x1 -> 3x3 -> 1x1 and the 1x1 classifier found"

    if not report.run("layers", layers):
        return report

    torch.manual_seed(1)
    ref = ElementWiseAttention(channels, num_classes, hidden).double()
    for p in ref.parameters():  # larger than the default init, so that the mistakes show
        nn.init.normal_(p, 0.0, 0.5)
    student = state["student"].double()
    with torch.no_grad():
        for role, conv in state["convs"].items():
            conv.weight.copy_(getattr(ref, role).weight)
            conv.bias.copy_(getattr(ref, role).bias)
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)

    def shape():
        out = _score_vector(student(x))
        assert out.shape == (3, num_classes), \
            f"expected the score vector [B, K] = [3, {num_classes}] for x of shape {list(x.shape)}, got {list(out.shape)}"
        return f"{list(x.shape)} -> {list(out.shape)}"

    if not report.run("output shape", shape):
        return report

    def values():
        with torch.no_grad():
            got = _score_vector(student(x))
            expected = _variant(ref, x, None)
            if torch.allclose(got, expected, rtol=1e-6, atol=1e-8):
                return compare(got, expected, "score vector", rtol=1e-6, atol=1e-8)
            for mistake, message in _MISTAKES.items():
                if torch.allclose(got, _variant(ref, x, mistake), rtol=1e-6, atol=1e-8):
                    raise AssertionError(message)
        return compare(got, expected, "score vector", rtol=1e-6, atol=1e-8)

    report.run("score vector", values)

    def any_size():
        y = torch.randn(2, channels, 3, 7, dtype=torch.float64)
        with torch.no_grad():
            return compare(_score_vector(student(y)), _variant(ref, y, None), "score vector on a 3x7 map",
                           rtol=1e-6, atol=1e-8)

    report.run("another map size (3x7)", any_size)
    return report


# ----------------------------------------------------------------------------- training step
def small_triple_densenet(num_classes: int = 4, seed: int = 0) -> DenseNet:
    """A DenseNet with triple attention small enough for a checker (two blocks of one layer)."""
    torch.manual_seed(seed)
    return densenet121(num_classes, "triple", growth_rate=4, block_config=(1, 1), num_init_features=8,
                       hidden=8, reduction=2, scale_reduction=2)


def _reference_step(model, images, labels, optimizer, aux_weight: float) -> torch.Tensor:
    logits, aux = model(images, return_aux=True)
    loss = F.cross_entropy(logits, labels) + aux_weight * F.cross_entropy(aux, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def check_training_step(step: Callable, aux_weight: float = 0.5) -> Report:
    """Check ``step(model, images, labels, optimizer, aux_weight) -> loss``.

    The step must compute ``CE(logits, y) + aux_weight * CE(aux, y)`` from
    ``logits, aux = model(images, return_aux=True)``, zero the gradients, back-propagate, take one
    optimiser step and return the loss (a tensor or a float). The checker calls it twice on a small
    triple-attention DenseNet and compares the loss and every weight with a reference step.
    """
    report = Report(f"Training-step check: {getattr(step, '__name__', step)} (aux_weight={aux_weight})")
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    models = {who: small_triple_densenet() for who in ("student", "reference")}
    optims = {who: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for who, m in models.items()}
    losses: dict[str, list[float]] = {"student": [], "reference": []}

    def run_student():
        for _ in range(2):
            loss = step(models["student"], images, labels, optims["student"], aux_weight)
            assert isinstance(loss, (torch.Tensor, numbers.Real)), \
                f"expected the step to return the loss (a tensor or a float), got {type(loss).__name__}"
            losses["student"].append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))
        return f"losses {losses['student'][0]:.4f}, {losses['student'][1]:.4f}"

    if not report.run("runs twice", run_student):
        return report
    for _ in range(2):
        losses["reference"].append(float(_reference_step(models["reference"], images, labels,
                                                         optims["reference"], aux_weight)))

    def first_loss():
        got, expected = losses["student"][0], losses["reference"][0]
        if abs(got - expected) < 1e-5:
            return f"{got:.4f} = CE(logits, y) + {aux_weight} * CE(aux, y)"
        fresh = small_triple_densenet()
        with torch.no_grad():
            logits, aux = fresh(images, return_aux=True)
        main, auxiliary = F.cross_entropy(logits, labels).item(), F.cross_entropy(aux, labels).item()
        if abs(got - main) < 1e-5:
            raise AssertionError(f"the loss is CE(logits, y) = {main:.4f} alone: the auxiliary term "
                                 f"{aux_weight} * CE(aux, y) is missing")
        if abs(got - (main + auxiliary)) < 1e-5:
            raise AssertionError(f"the auxiliary loss is added with weight 1, not aux_weight = {aux_weight}")
        if abs(got - auxiliary) < 1e-5 or abs(got - aux_weight * auxiliary) < 1e-5:
            raise AssertionError("the loss is the auxiliary term alone: the main classifier's CE(logits, y) is missing")
        if abs(got - (aux_weight * main + auxiliary)) < 1e-5:
            raise AssertionError("aux_weight multiplies the main loss instead of the auxiliary one")
        raise AssertionError(f"expected the loss {expected:.4f} = CE(logits, y) + {aux_weight} * CE(aux, y) "
                             f"(main {main:.4f}, auxiliary {auxiliary:.4f}), got {got:.4f}")

    report.run("loss of the first step", first_loss)

    def weights():
        student = dict(models["student"].named_parameters())
        stale = [n for n, p in models["reference"].named_parameters()
                 if not torch.allclose(student[n], p, rtol=1e-4, atol=1e-6)]
        if not stale:
            return "every weight matches the reference after two steps"
        untouched = small_triple_densenet()
        if all(torch.equal(p, dict(untouched.named_parameters())[n]) for n, p in student.items()):
            raise AssertionError("no weight changed: call loss.backward() and optimizer.step()")
        if all(n.startswith("element_attention") for n in stale):
            raise AssertionError("the element-wise branch's weights differ from the reference: its loss "
                                 "does not reach it as it should")
        raise AssertionError(f"{len(stale)} weight tensors differ from the reference after two steps "
                             f"(e.g. {stale[0]}); did you zero the gradients before backward()?")

    report.run("weights after two steps", weights)
    return report


# ----------------------------------------------------------------------------- shapes
_SHAPE_KEYS = ("X_CA", "A", "S", "score")


def check_shapes(answer: dict | Callable[[], dict], batch: int = 8, image_size: int = 32,
                 num_classes: int = 10) -> Report:
    """Check predicted shapes for the course's DenseNet-121 with triple attention.

    ``answer`` (or what ``answer()`` returns, when it is a function) maps ``"X_CA"`` (the channel-attended last feature map), ``"A"`` (the class
    attention maps), ``"S"`` (the score maps) and ``"score"`` (the auxiliary score vector) to
    shapes (tuples or lists of ints) for a batch of ``batch`` images of ``image_size`` pixels and
    ``num_classes`` classes. The checker builds the real network and measures them.
    """
    report = Report(f"Shape check: DenseNet-121 with triple attention, batch {batch}, "
                    f"{image_size}x{image_size} images, {num_classes} classes")

    def form():
        nonlocal answer
        if callable(answer):
            answer = answer()
        assert isinstance(answer, dict), f"expected a dict of shapes, got {type(answer).__name__}"
        missing = [k for k in _SHAPE_KEYS if k not in answer]
        assert not missing, f"missing keys {missing}; expected {list(_SHAPE_KEYS)}"
        for k in _SHAPE_KEYS:
            value = answer[k]
            assert isinstance(value, (tuple, list, torch.Size)) and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value), \
                f"{k}: expected a tuple of ints such as (2, 3), got {value!r}"
        return "four shapes given"

    if not report.run("answer", form):
        return report
    model = densenet121(num_classes, "triple").eval()
    with torch.no_grad():
        x = torch.zeros(batch, 3, image_size, image_size)
        features, _ = model.features(x)
        x_ca = model.channel_attention(features)
        score, maps = model.element_attention(x_ca, return_attention=True)
    truth = {"X_CA": x_ca.shape, "A": maps["element"].shape, "S": maps["scores"].shape, "score": score.shape}
    hints = {"X_CA": "the last dense block of DenseNet-121 has 1024 channels, after three transitions that "
                     "halve H and W",
             "A": "one attention map per class, at the resolution of X_CA",
             "S": "one score map per class (the 1x1 classifier at every position)",
             "score": "A * S summed over the positions: one score per class and image"}
    for key in _SHAPE_KEYS:
        def one(key=key):
            got, expected = tuple(answer[key]), tuple(truth[key])
            assert got == expected, f"expected {list(expected)}, got {list(got)} ({hints[key]})"
            return f"{list(expected)}"
        report.run(key, one)
    return report
