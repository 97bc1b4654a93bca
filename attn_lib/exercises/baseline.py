"""Checkers for the exercises of the baseline chapter (``notebooks/01_baseline``).

    from attn_lib.exercises import baseline
    report = baseline.check_accuracy(accuracy_topk)              # top-k accuracy in percent
    report = baseline.check_stratified_split(stratified_split)   # a seeded, per-class split
    report = baseline.check_random_crop_flip(random_crop_flip)   # crop + flip as tensor code

Each checker runs the student's function on small inputs built so that the usual mistakes give
different answers, and returns a :class:`~attn_lib.exercises.report.Report`. Where an answer is
wrong, the checker recomputes it with those mistakes (the error rate instead of the accuracy, as
the circulating training script does; ``k`` off by one; ranking along the batch axis; a fraction
instead of a percentage; ``torch.randint``'s exclusive upper bound; a vertical flip; ...) and
says which one the student's answer matches. A checker never raises because the student's code
is wrong.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data import PAD
from ..train import accuracy as reference_accuracy
from .report import validate_checkers
from .report import Report

__all__ = ["check_accuracy", "check_stratified_split", "check_random_crop_flip"]


# ----------------------------------------------------------------------------- accuracy_topk
def _as_number(out) -> float:
    """The student's answer as a float: a Python number or a one-element tensor."""
    if isinstance(out, torch.Tensor):
        assert out.numel() == 1, (
            f"expected one number (the accuracy of the whole batch, in percent), got a tensor of shape "
            f"{list(out.shape)}; average over the batch")
        return float(out.item())
    assert isinstance(out, (int, float, np.floating, np.integer)) and not isinstance(out, bool), \
        f"expected a number (a float in percent), got {type(out).__name__}"
    return float(out)


def _topk_hits(logits: torch.Tensor, target: torch.Tensor, k: int, dim: int = 1) -> float:
    """Percentage of hits when ranking along ``dim``; ``dim=0`` is the wrong-axis variant (it treats
    the columns of a square ``[B, K]`` matrix as the samples)."""
    k = max(0, min(k, logits.shape[dim]))
    if k == 0:
        return 0.0
    top = logits.topk(k, dim=dim).indices
    hits = top.eq(target[:, None]).any(1) if dim == 1 else top.eq(target[None, :]).any(0)
    return hits.double().mean().item() * 100.0


def _diagnose_accuracy(got: float, logits: torch.Tensor, target: torch.Tensor, k: int) -> str:
    expected = _topk_hits(logits, target, k)
    candidates = [
        (100.0 - expected, "your value is the error rate (100 - accuracy): count the samples whose "
                           "target is among the top k, not the ones whose target is missing"),
        (expected / 100.0, "your value is a fraction; the checker expects a percentage (multiply by 100)"),
        (_topk_hits(logits, target, k - 1) if k > 1 else float("nan"),
         f"your value is the top-{k - 1} accuracy: k is off by one (the k-th largest logit must count)"),
        (_topk_hits(logits, target, k + 1), f"your value is the top-{k + 1} accuracy: k is off by one "
                                            f"(take exactly the k largest logits)"),
    ]
    if logits.shape[0] == logits.shape[1]:
        candidates.append((_topk_hits(logits, target, k, dim=0),
                           "your value ranks the logits along dim 0 (the batch); rank each row "
                           "(dim=1: one row per sample, one column per class)"))
    for value, why in candidates:
        if abs(value - expected) > 1e-6 and abs(got - value) < 1e-4:
            return "; " + why
    return ""


def _rank_case(ranks: list[int], classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with distinct values in which the target of sample ``b`` is the ``ranks[b]``-th
    largest logit of its row (rank 1 = the largest)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([torch.randperm(classes, generator=g) for _ in ranks]).double()
    order = logits.argsort(dim=1, descending=True)
    target = order[torch.arange(len(ranks)), torch.tensor(ranks) - 1].clone()
    return logits, target


def check_accuracy(fn: Callable[[torch.Tensor, torch.Tensor, int], float]) -> Report:
    """Check ``fn(logits, target, k) -> float``, the top-k accuracy in percent.

    ``logits: [B, K]`` (one row per sample, one column per class), ``target: [B]`` class indices;
    the answer is the percentage (0 to 100) of samples whose target is among the ``k`` largest
    logits of its row.
    """
    report = Report("accuracy_topk(logits, target, k): percentage of targets among the k largest logits")

    def case(logits, target, k, what):
        expected = _topk_hits(logits, target, k)
        logits_in, target_in = logits.clone(), target.clone()
        got = _as_number(fn(logits_in, target_in, k))
        assert abs(got - expected) < 1e-4, (
            f"{what}: expected {expected:.4g}, got {got:.4g}" + _diagnose_accuracy(got, logits, target, k))
        assert torch.equal(logits_in, logits) and torch.equal(target_in, target), \
            "the function changed its inputs in place (e.g. an in-place mul_ or sort_); leave them as they are"
        return f"{got:.4g}"

    def returns_a_number():
        logits, target = _rank_case([1, 2, 1, 1, 3], classes=5)
        got = _as_number(fn(logits.clone(), target.clone(), 1))
        return f"{got:.4g}"

    if not report.run("returns one number", returns_a_number):
        return report

    def perfect():
        logits, target = _rank_case([1] * 8, classes=10, seed=1)
        return case(logits, target, 1, "a classifier that is always right must score 100")

    def half_right():
        logits, target = _rank_case([1, 4, 1, 2, 1, 3, 1, 10], classes=10, seed=2)
        return case(logits, target, 1, "four of eight targets have the largest logit")

    # rank mixes chosen so that accuracy, error, top-(k-1) and top-(k+1) all differ
    def kth_counts():
        logits, target = _rank_case([3, 1, 3, 4, 1, 3], seed=3)
        return case(logits, target, 3, "targets at ranks 3, 1, 3, 4, 1, 3 with k = 3")

    def beyond_k():
        logits, target = _rank_case([4, 1, 4, 3, 4, 4], seed=4)
        return case(logits, target, 3, "targets at ranks 4, 1, 4, 3, 4, 4 with k = 3")

    def rows_are_samples():
        # square logits: ranking the columns gives another answer than ranking the rows
        g = torch.Generator().manual_seed(5)
        for trial in range(50):
            logits = torch.randn(6, 6, generator=g, dtype=torch.float64)
            target = torch.randint(0, 6, (6,), generator=g)
            if abs(_topk_hits(logits, target, 2) - _topk_hits(logits, target, 2, dim=0)) > 10:
                break
        return case(logits, target, 2, "square logits [6, 6], k = 2")

    def rectangular():
        g = torch.Generator().manual_seed(6)
        logits = torch.randn(3, 10, generator=g, dtype=torch.float64)
        target = torch.tensor([logits[0].argmax().item(), logits[1].argsort()[0].item(), logits[2].argsort()[-4].item()])
        return case(logits, target, 5, "3 samples, 10 classes, k = 5 (more classes than samples)")

    def random_batches():
        g = torch.Generator().manual_seed(7)
        details = []
        for batch, classes, k in [(64, 10, 1), (64, 10, 5), (50, 100, 5), (1, 10, 2)]:
            logits = torch.randn(batch, classes, generator=g)
            target = torch.randint(0, classes, (batch,), generator=g)
            got = _as_number(fn(logits.clone(), target.clone(), k))
            expected = reference_accuracy(logits, target, (k,))[0]
            assert abs(got - expected) < 1e-3, (
                f"B={batch}, K={classes}, k={k}: expected {expected:.4g} (as attn_lib.train.accuracy), got "
                f"{got:.4g}" + _diagnose_accuracy(got, logits.double(), target, k))
            details.append(f"{got:.3g}")
        return "agrees with attn_lib.train.accuracy: " + ", ".join(details)

    def k_covers_all():
        g = torch.Generator().manual_seed(8)
        logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
        target = torch.randint(0, 4, (5,), generator=g)
        return case(logits, target, 4, "k equal to the number of classes must score 100")

    report.run("a perfect classifier scores 100 (accuracy, not error; percent, not fraction)", perfect)
    report.run("half right scores 50", half_right)
    report.run("a target at rank k counts", kth_counts)
    report.run("a target at rank k + 1 does not count", beyond_k)
    report.run("classes are along dim 1 (square logits)", rows_are_samples)
    report.run("classes are along dim 1 (more classes than samples)", rectangular)
    report.run("k = number of classes gives 100", k_covers_all)
    report.run("random batches match attn_lib.train.accuracy", random_batches)
    return report


# ----------------------------------------------------------------------------- stratified_split
def _shares(y: np.ndarray, n_val: int) -> dict[int, float]:
    classes, counts = np.unique(y, return_counts=True)
    return {int(c): n * n_val / len(y) for c, n in zip(classes, counts)}


def check_stratified_split(fn: Callable[[np.ndarray, int, int], tuple]) -> Report:
    """Check ``fn(y, n_val, seed) -> (train_idx, val_idx)``, a seeded stratified split.

    ``y``: integer labels ``[N]`` (a NumPy array). The answer: two 1-D integer index arrays that are
    disjoint and cover ``0 .. N-1`` once, ``len(val_idx) == n_val``, every class's share of the
    validation set equal to its share of ``y`` (``n_val * N_c / N``, rounded up or down), the same
    split for the same seed and another for another seed.
    """
    report = Report("stratified_split(y, n_val, seed): a seeded split with every class in proportion")
    rng = np.random.default_rng(0)
    balanced = rng.permutation(np.repeat(np.arange(10), 100))           # 1000 labels, 100 per class
    unbalanced = rng.permutation(np.repeat(np.arange(3), [50, 30, 20]))  # shares 7.5, 4.5, 3 of 15
    got: dict = {}

    def call(y, n_val, seed):
        y_in = y.copy()
        out = fn(y_in, n_val, seed)
        assert np.array_equal(y_in, y), "the function changed y in place (e.g. shuffled it); work on indices"
        assert isinstance(out, tuple) and len(out) == 2, \
            f"expected a tuple (train_idx, val_idx), got {type(out).__name__}"
        parts = []
        for name, idx in zip(("train_idx", "val_idx"), out):
            idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
            assert idx.ndim == 1 and (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)), \
                f"expected {name} to be a 1-D array of integer indices, got {idx.dtype} of shape {list(idx.shape)}"
            parts.append(idx)
        return parts[0], parts[1]

    def runs():
        got["train"], got["val"] = call(balanced, 100, 0)
        return f"train {len(got['train'])}, val {len(got['val'])}"

    if not report.run("returns (train_idx, val_idx) as integer index arrays", runs):
        return report

    def sizes():
        train, val = got["train"], got["val"]
        assert len(val) == 100, f"1000 labels, n_val = 100: expected 100 validation indices, got {len(val)}"
        assert len(train) == 900, f"expected the other 900 indices in train_idx, got {len(train)}"
        return "100 / 900"

    def partition():
        train, val = got["train"], got["val"]
        both = np.concatenate([train, val])
        assert both.min() >= 0 and both.max() < 1000, \
            f"indices must lie in 0 .. 999, got values from {both.min()} to {both.max()}"
        overlap = np.intersect1d(train, val)
        assert len(overlap) == 0, f"{len(overlap)} indices are in both sets (e.g. {overlap[:3].tolist()}); " \
                                  f"the validation images must be held out of training"
        assert len(np.unique(val)) == len(val), "val_idx contains repeats: sample without replacement"
        assert len(np.unique(both)) == 1000, \
            f"train and val together cover {len(np.unique(both))} of the 1000 indices; every index goes to one side"
        return "disjoint, every index once"

    def per_class(y, n_val, train_val, label):
        val = train_val[1]
        shares = _shares(y, n_val)
        counts = np.bincount(y[val], minlength=len(shares))
        for c, share in shares.items():
            assert np.floor(share) <= counts[c] <= np.ceil(share), (
                f"{label}: class {c} has {counts[c]} validation images, expected {share:g} "
                f"(its share n_val * N_c / N, rounded up or down); sample each class separately")
        return "per class: " + ", ".join(str(int(n)) for n in counts)

    def balanced_classes():
        return per_class(balanced, 100, (got["train"], got["val"]), "1000 labels, 100 per class, n_val = 100")

    def unbalanced_classes():
        train, val = call(unbalanced, 15, 0)
        assert len(val) == 15 and len(train) == 85, (
            f"classes of 50, 30, 20 images, n_val = 15: expected 15 validation and 85 training indices, got "
            f"{len(val)} and {len(train)}" + ("; rounding every share down loses images: hand the "
                                              "remainder to the classes with the largest fractions"
                                              if len(val) < 15 else ""))
        return per_class(unbalanced, 15, (train, val), "classes of 50, 30, 20 images, n_val = 15")

    def reproducible():
        again = call(balanced, 100, 0)[1]
        assert np.array_equal(np.sort(again), np.sort(got["val"])), \
            "the same seed gave another validation set: draw every random number from a generator made " \
            "from the seed (np.random.default_rng(seed))"
        return "same seed, same split"

    def seed_matters():
        other = call(balanced, 100, 1)[1]
        assert not np.array_equal(np.sort(other), np.sort(got["val"])), \
            "seeds 0 and 1 gave the same validation set: the choice within each class must be random, " \
            "drawn from a generator made from the seed"
        return "seed 1 gives another split"

    report.run("sizes: n_val validation, the rest training", sizes)
    report.run("disjoint and complete", partition)
    report.run("every class in proportion (balanced labels)", balanced_classes)
    report.run("every class in proportion (unbalanced labels)", unbalanced_classes)
    report.run("reproducible from the seed", reproducible)
    report.run("another seed, another split", seed_matters)
    return report


# ----------------------------------------------------------------------------- random_crop_flip
def _coded_images(batch: int, size: int, pad: int, device) -> torch.Tensor:
    """Padded images whose pixels say where they are: channel 0 holds the row, channel 1 the
    column and channel 2 the image's index (mod 256), so any crop can be read back."""
    side = size + 2 * pad
    rows = torch.arange(side, device=device).view(1, side, 1).expand(batch, side, side)
    cols = torch.arange(side, device=device).view(1, 1, side).expand(batch, side, side)
    ident = (torch.arange(batch, device=device) % 256).view(batch, 1, 1).expand(batch, side, side)
    return torch.stack([rows, cols, ident], dim=1).to(torch.uint8).contiguous()


def check_random_crop_flip(fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                           device: str | torch.device = "cpu", pad: int = PAD) -> Report:
    """Check ``fn(x_padded, generator) -> crops``: a random crop plus a horizontal flip per image.

    ``x_padded: [B, 3, S + 2*pad, S + 2*pad]`` uint8 (images already zero-padded by ``pad``);
    the answer is ``[B, 3, S, S]`` uint8 on the same device, where image ``b`` is the window of
    ``x_padded[b]`` at an offset ``(i, j)`` drawn uniformly from ``{0, ..., 2*pad}`` on each axis,
    independently per image, and flipped left-right with probability 1/2 — the distribution of
    ``RandomCrop(S, padding=pad)`` + ``RandomHorizontalFlip()``. All randomness comes from
    ``generator`` (a ``torch.Generator`` on ``device``).
    """
    device = torch.device(device)
    size, batch, calls = 32, 250, 6
    report = Report(f"random_crop_flip(x_padded, generator): crop {size}x{size} at a random offset in "
                    f"0..{2 * pad}, flip left-right with probability 1/2")
    x = _coded_images(batch, size, pad, device)
    got: dict = {}

    def call(seed: int) -> torch.Tensor:
        x_in = x.clone()
        out = fn(x_in, torch.Generator(device).manual_seed(seed))
        assert torch.equal(x_in, x), "the function changed its input in place; return new tensors"
        assert isinstance(out, torch.Tensor), f"expected a tensor, got {type(out).__name__}"
        return out

    def runs():
        out = call(0)
        assert list(out.shape) == [batch, 3, size, size], \
            f"input [{batch}, 3, {size + 2 * pad}, {size + 2 * pad}]: expected [{batch}, 3, {size}, {size}], " \
            f"got {list(out.shape)}"
        assert out.dtype == torch.uint8, f"expected uint8 (augment the raw pixels), got {out.dtype}"
        assert out.device.type == device.type, f"expected the output on {device}, got {out.device}"
        got["first"] = out
        return f"[{batch}, 3, {size}, {size}] uint8"

    if not report.run("returns uint8 crops of the right shape on the input's device", runs):
        return report

    def decode(out: torch.Tensor) -> dict:
        """Offset and flip of every output image; asserts it is an exact window of its own image."""
        out = out.long()
        top = out[:, 0, 0, 0]
        row_step = out[:, 0, 1:, 0] - out[:, 0, :-1, 0]
        col_step = out[:, 1, 0, 1:] - out[:, 1, 0, :-1]
        flipped = (col_step == -1).all(dim=1)
        unflipped = (col_step == 1).all(dim=1)
        if (row_step == -1).all(dim=1).any():
            raise AssertionError("some crops are upside down: the flip must reverse the columns (last axis), "
                                 "not the rows")
        if not (row_step == 1).all() or not (flipped | unflipped).all():
            raise AssertionError("some outputs are not a 32x32 window of the padded image: take consecutive "
                                 "rows and columns (a slice or a gather of offset + arange(32))")
        left = torch.where(flipped, out[:, 1, 0, -1], out[:, 1, 0, 0])
        base = torch.arange(size, device=out.device)
        rows = top[:, None] + base
        cols = left[:, None] + torch.where(flipped[:, None], size - 1 - base, base)
        expected = x[torch.arange(len(out), device=out.device)[:, None, None, None],
                     torch.arange(3, device=out.device)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        same = expected.long().eq(out).flatten(1).all(1)
        if not same.all():
            b = int((~same).nonzero()[0])
            raise AssertionError(f"image {b} is not a crop of image {b} (channels or images mixed up?)")
        return {"top": top.cpu(), "left": left.cpu(), "flip": flipped.cpu()}

    def windows():
        got["draws"] = [decode(got["first"])] + [decode(call(seed)) for seed in range(1, calls)]
        return f"{batch * calls} crops read back exactly"

    if not report.run("every output is a window of its own padded image, flipped left-right or not", windows):
        return report
    top = torch.cat([d["top"] for d in got["draws"]])
    left = torch.cat([d["left"] for d in got["draws"]])
    flip = torch.cat([d["flip"] for d in got["draws"]])
    n = len(top)

    def offsets_cover():
        for name, off in (("row", top), ("column", left)):
            seen = sorted(set(off.tolist()))
            hint = ""
            if max(seen) == 2 * pad - 1:
                hint = f"; offset {2 * pad} never appears: torch.randint's upper bound is exclusive, " \
                       f"use torch.randint(0, {2 * pad + 1}, ...)"
            elif len(seen) == 1:
                hint = "; there is no crop at all"
            assert seen == list(range(2 * pad + 1)), \
                f"{name} offsets seen: {seen}; expected every value 0..{2 * pad}" + hint
        return f"0..{2 * pad} on both axes"

    def offsets_uniform():
        for name, off in (("row", top), ("column", left)):
            freq = torch.bincount(off, minlength=2 * pad + 1).double() / n
            assert freq.min() > 0.06 and freq.max() < 0.17, \
                f"{name} offsets are not uniform: frequencies {[round(f, 3) for f in freq.tolist()]}, " \
                f"expected about {1 / (2 * pad + 1):.3f} each"
        same = (top == left).double().mean().item()
        assert same < 0.2, f"the row and column offsets are equal in {same:.0%} of the crops: draw them separately"
        return "about 1/9 each, rows and columns independent"

    def flips_half():
        share = flip.double().mean().item()
        hint = "; no image is flipped" if share == 0 else ("; every image is flipped" if share == 1 else "")
        assert 0.4 < share < 0.6, f"{share:.0%} of the crops are flipped; expected about 50%" + hint
        return f"{share:.0%} flipped"

    def per_image():
        d = got["draws"][0]
        kinds = len(set(zip(d["top"].tolist(), d["left"].tolist(), d["flip"].tolist())))
        assert kinds > 50, f"the {batch} images of one batch share {kinds} crop(s): draw an offset and a flip " \
                           f"for every image, not one for the whole batch"
        return f"{kinds} different crops in one batch"

    def reproducible():
        again = call(0)
        assert torch.equal(again, got["first"]), \
            "the same generator seed gave other crops: draw every random number with generator=generator"
        other = call(12345)
        assert not torch.equal(other, got["first"]), "another generator seed gave the same crops"
        return "same seed, same crops; another seed, others"

    report.run("offsets take every value 0..2*pad", offsets_cover)
    report.run("offsets are uniform and independent", offsets_uniform)
    report.run("about half the crops are flipped", flips_half)
    report.run("each image gets its own crop", per_image)
    report.run("randomness comes from the generator", reproducible)
    return report


validate_checkers(globals())
