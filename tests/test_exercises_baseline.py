"""The baseline chapter's checkers pass correct solutions and name the mistakes of wrong ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_lib.data import GPULoader, make_synthetic, stratified_split
from attn_lib.exercises.baseline import check_accuracy, check_random_crop_flip, check_stratified_split


def failed(report) -> dict[str, str]:
    return {name: detail for name, ok, detail in report.checks if not ok}


def assert_caught(report, check: str, *phrases: str) -> None:
    """``report`` failed, ``check`` among its failures, its reason containing every phrase."""
    assert not report.passed, str(report)
    wrong = failed(report)
    assert check in wrong, f"{check!r} did not fail:\n{report}"
    for phrase in phrases:
        assert phrase in wrong[check], f"{phrase!r} not in {wrong[check]!r}"


# ----------------------------------------------------------------------------- accuracy_topk
def accuracy_correct(logits, target, k):
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return top.eq(target[:, None]).any(dim=1).float().mean().item() * 100


def accuracy_error_rate(logits, target, k):  # the circulating script: counts the misses
    return 100 - accuracy_correct(logits, target, k)


def accuracy_fraction(logits, target, k):
    return accuracy_correct(logits, target, k) / 100


def accuracy_k_minus_one(logits, target, k):
    return accuracy_correct(logits, target, k - 1) if k > 1 else 0.0


def accuracy_k_plus_one(logits, target, k):
    return accuracy_correct(logits, target, k + 1)


def accuracy_wrong_dim(logits, target, k):
    top = logits.topk(k, dim=0).indices  # ranks the batch, not the classes
    return top.eq(target[None, :]).any(dim=0).float().mean().item() * 100


def accuracy_per_sample(logits, target, k):
    return logits.topk(k, dim=1).indices.eq(target[:, None]).any(dim=1).float() * 100


def accuracy_in_place(logits, target, k):
    logits.mul_(2)  # harmless to the ranking, harmful to the caller
    return accuracy_correct(logits, target, k)


def test_accuracy_checker_passes_a_correct_solution():
    report = check_accuracy(accuracy_correct)
    assert report.passed, str(report)
    assert len(report.checks) >= 8


def test_accuracy_checker_passes_a_tensor_answer():
    report = check_accuracy(lambda logits, target, k: torch.tensor(accuracy_correct(logits, target, k)))
    assert report.passed, str(report)


def test_accuracy_checker_names_the_error_rate():
    report = check_accuracy(accuracy_error_rate)
    assert_caught(report, "a perfect classifier scores 100 (accuracy, not error; percent, not fraction)",
                  "expected 100, got 0", "error rate")
    assert_caught(report, "a target at rank k counts", "error rate")


def test_accuracy_checker_names_a_fraction():
    report = check_accuracy(accuracy_fraction)
    assert_caught(report, "a perfect classifier scores 100 (accuracy, not error; percent, not fraction)",
                  "fraction")


def test_accuracy_checker_names_k_off_by_one_both_ways():
    assert_caught(check_accuracy(accuracy_k_minus_one), "a target at rank k counts", "top-2 accuracy",
                  "off by one")
    assert_caught(check_accuracy(accuracy_k_plus_one), "a target at rank k + 1 does not count",
                  "top-4 accuracy", "off by one")


def test_accuracy_checker_names_the_wrong_dimension():
    report = check_accuracy(accuracy_wrong_dim)
    assert_caught(report, "classes are along dim 1 (square logits)", "dim 0")
    assert "classes are along dim 1 (more classes than samples)" in failed(report)


def test_accuracy_checker_wants_one_number_and_untouched_inputs():
    report = check_accuracy(accuracy_per_sample)
    assert_caught(report, "returns one number", "one number", "shape [5]")
    assert len(report.checks) == 1  # nothing else is run on a non-number
    assert_caught(check_accuracy(accuracy_in_place), "a perfect classifier scores 100 (accuracy, not error; "
                  "percent, not fraction)", "changed its inputs")


def test_accuracy_checker_reports_a_stub_without_raising():
    def stub(logits, target, k):
        raise NotImplementedError("write accuracy_topk")
    report = check_accuracy(stub)
    assert_caught(report, "returns one number", "not implemented yet")


# ----------------------------------------------------------------------------- stratified_split
def split_correct(y, n_val, seed):
    return stratified_split(y, n_val, seed)


def split_by_hand(y, n_val, seed):
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    share = counts * n_val / len(y)
    take = np.floor(share).astype(int)
    take[np.argsort(take - share)[: n_val - take.sum()]] += 1
    val = np.concatenate([rng.choice(np.flatnonzero(y == c), t, replace=False) for c, t in zip(classes, take)])
    return np.setdiff1d(np.arange(len(y)), val), val


def split_not_stratified(y, n_val, seed):
    order = np.random.default_rng(seed).permutation(len(y))
    return order[n_val:], order[:n_val]


def split_ignores_seed(y, n_val, seed):  # the first images of each class, always
    per_class = n_val // len(np.unique(y))
    val = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    return np.setdiff1d(np.arange(len(y)), val), val


def split_unseeded(y, n_val, seed):
    train, val = split_by_hand(y, n_val, np.random.randint(1 << 30))
    return train, val


def split_with_replacement(y, n_val, seed):
    rng = np.random.default_rng(seed)
    per_class = n_val // len(np.unique(y))
    val = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=True) for c in np.unique(y)])
    return np.setdiff1d(np.arange(len(y)), val), val


def split_floor_only(y, n_val, seed):
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    take = (counts * n_val // len(y)).astype(int)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)])
    return np.setdiff1d(np.arange(len(y)), val), val


def split_train_keeps_val(y, n_val, seed):
    train, val = split_by_hand(y, n_val, seed)
    return np.arange(len(y)), val


def test_split_checker_passes_the_library_and_a_hand_written_split():
    for fn in (split_correct, split_by_hand):
        report = check_stratified_split(fn)
        assert report.passed, str(report)


def test_split_checker_passes_torch_index_tensors():
    report = check_stratified_split(lambda y, n, s: tuple(torch.from_numpy(i) for i in split_by_hand(y, n, s)))
    assert report.passed, str(report)


def test_split_checker_catches_a_split_that_is_not_stratified():
    report = check_stratified_split(split_not_stratified)
    assert_caught(report, "every class in proportion (balanced labels)", "validation images, expected 10",
                  "sample each class separately")


def test_split_checker_catches_a_split_that_ignores_the_seed():
    assert_caught(check_stratified_split(split_ignores_seed), "another seed, another split", "same validation set")


def test_split_checker_catches_unseeded_randomness():
    assert_caught(check_stratified_split(split_unseeded), "reproducible from the seed", "default_rng(seed)")


def test_split_checker_catches_sampling_with_replacement():
    assert_caught(check_stratified_split(split_with_replacement), "disjoint and complete", "repeats")


def test_split_checker_catches_shares_rounded_down():
    report = check_stratified_split(split_floor_only)
    assert_caught(report, "every class in proportion (unbalanced labels)", "expected 15 validation",
                  "remainder")
    assert "every class in proportion (balanced labels)" not in failed(report)


def test_split_checker_catches_validation_images_left_in_training():
    report = check_stratified_split(split_train_keeps_val)
    assert_caught(report, "sizes: n_val validation, the rest training", "expected the other 900")
    assert_caught(report, "disjoint and complete", "in both sets")


# ----------------------------------------------------------------------------- random_crop_flip
def crop_flip_correct(x, generator, pad=4):
    b, _, h, w = x.shape
    size = h - 2 * pad
    i = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    j = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    base = torch.arange(size, device=x.device)
    rows = (i[:, None] + base)[:, None, :, None]
    cols = (j[:, None] + torch.where(flip[:, None], size - 1 - base, base))[:, None, None, :]
    return x[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
             rows, cols]


def crop_flip_loop(x, generator, pad=4):
    out = []
    for img in x:
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        crop = img[:, i:i + x.shape[2] - 2 * pad, j:j + x.shape[3] - 2 * pad]
        out.append(crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(out)


def crop_flip_exclusive_high(x, generator, pad=4):
    b, _, h, w = x.shape
    out = []
    for img in x:
        i, j = torch.randint(0, 2 * pad, (2,), generator=generator).tolist()  # never 2 * pad
        crop = img[:, i:i + h - 2 * pad, j:j + w - 2 * pad]
        out.append(crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(out)


def crop_flip_vertical(x, generator, pad=4):
    out = crop_flip_loop(x, generator, pad)
    return out.flip(-2)


def crop_flip_one_offset_per_batch(x, generator, pad=4):
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    crop = x[:, :, i:i + x.shape[2] - 2 * pad, j:j + x.shape[3] - 2 * pad]
    return crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop


def crop_flip_no_flip(x, generator, pad=4):
    out = []
    for img in x:
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        out.append(img[:, i:i + x.shape[2] - 2 * pad, j:j + x.shape[3] - 2 * pad])
    return torch.stack(out)


def crop_flip_global_rng(x, generator, pad=4):
    return crop_flip_loop(x, torch.default_generator, pad)


def crop_flip_same_offset_both_axes(x, generator, pad=4):
    out = []
    for img in x:
        i = int(torch.randint(0, 2 * pad + 1, (1,), generator=generator))
        crop = img[:, i:i + x.shape[2] - 2 * pad, i:i + x.shape[3] - 2 * pad]
        out.append(crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(out)


def crop_flip_float(x, generator, pad=4):
    return crop_flip_correct(x, generator, pad).float() / 255


def test_crop_checker_passes_vectorised_and_loop_solutions():
    for fn in (crop_flip_correct, crop_flip_loop):
        report = check_random_crop_flip(fn)
        assert report.passed, str(report)


def test_crop_checker_passes_the_library_gpu_loader_augmentation():
    """GPULoader.augment draws the same distribution; wrapped to the exercise's signature it passes."""
    data = make_synthetic(4, seed=0)
    loader = GPULoader(data, 4, train=True)

    def via_loader(x, generator):
        loader.x, loader.generator, loader.size = x, generator, x.shape[-1] - 8
        return loader.augment(torch.arange(len(x)))
    report = check_random_crop_flip(via_loader)
    assert report.passed, str(report)


def test_crop_checker_names_the_exclusive_upper_bound():
    assert_caught(check_random_crop_flip(crop_flip_exclusive_high), "offsets take every value 0..2*pad",
                  "never appears", "randint(0, 9")


def test_crop_checker_catches_a_vertical_flip():
    assert_caught(check_random_crop_flip(crop_flip_vertical),
                  "every output is a window of its own padded image, flipped left-right or not", "upside down")


def test_crop_checker_catches_one_crop_for_the_whole_batch():
    assert_caught(check_random_crop_flip(crop_flip_one_offset_per_batch), "each image gets its own crop",
                  "share 1 crop")


def test_crop_checker_catches_a_missing_flip():
    assert_caught(check_random_crop_flip(crop_flip_no_flip), "about half the crops are flipped", "no image is flipped")


def test_crop_checker_catches_randomness_outside_the_generator():
    assert_caught(check_random_crop_flip(crop_flip_global_rng), "randomness comes from the generator",
                  "generator=generator")


def test_crop_checker_catches_one_offset_for_both_axes():
    assert_caught(check_random_crop_flip(crop_flip_same_offset_both_axes), "offsets are uniform and independent",
                  "draw them separately")


def test_crop_checker_wants_uint8_pixels():
    report = check_random_crop_flip(crop_flip_float)
    assert_caught(report, "returns uint8 crops of the right shape on the input's device", "expected uint8")
    assert len(report.checks) == 1


@pytest.mark.parametrize("checker", [check_accuracy, check_stratified_split, check_random_crop_flip])
def test_checkers_never_raise_on_broken_code(checker):
    def broken(*args):
        return {}["missing"]
    report = checker(broken)
    assert not report.passed and "KeyError" in str(report)
