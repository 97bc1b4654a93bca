"""CIFAR-10/100 as uint8 arrays, a seeded stratified validation split, and two input pipelines.

Where the images come from (:func:`load_cifar`):

* torchvision's standard folder under ``data_dir`` (``cifar-10-batches-py`` /
  ``cifar-100-python``), downloaded when missing unless ``download=False``;
* ``.npz`` arrays in ``data_dir``: ``{name}_train.npz`` and ``{name}_test.npz`` (or
  ``{name}_test1000.npz``), each with ``x`` uint8 ``[N, 32, 32, 3]`` and ``y`` int64 ``[N]``;
* ``"synthetic"``: a small, learnable, clearly fake dataset (coloured stripes per class, plus
  noise) for tests and quick mode. Nothing else in the course calls it CIFAR.

The two pipelines apply the same augmentation — random crop of 32 from the image zero-padded by
4, horizontal flip with probability 1/2, normalisation by the training set's mean and std:

* :func:`dataloader` — torchvision transforms in DataLoader workers on the CPU (the reference
  recipe's pipeline);
* :class:`GPULoader` — the whole uint8 dataset lives on the device as a zero-padded 40×40 copy
  (3·40·40 bytes an image: 216 MB for a 45,000-image training split, 240 MB for 50,000), and
  crop, flip and normalisation are one gather per batch on the GPU. On a Colab GPU with two CPU
  cores, the CPU pipeline, not the GPU, is what limits training; this one removes that limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "ArrayDataset", "DataFileError", "DataNotFoundError", "DATASETS", "GPULoader", "MEAN_STD", "dataloader",
    "load_cifar", "make_synthetic", "stratified_split",
]

DATASETS = ("cifar10", "cifar100", "synthetic")
#: Per-channel mean and std of each training set, in [0, 1] units. CIFAR-100 has its own (a widely
#: reposted training script normalised CIFAR-100 with CIFAR-10's figures).
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.303, 0.337, 0.309), (0.267, 0.284, 0.271)),  # measured on make_synthetic()
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PAD = 4  # RandomCrop(32, padding=4), the standard CIFAR augmentation


class DataNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says where we looked."""


class DataFileError(ValueError):
    """A data file exists but cannot be used; the message names it, what was expected and what was found."""


NPZ_FORMAT = "an .npz array file with x uint8 [N, 32, 32, 3] and y int64 [N] (same N)"


def _read_npz(path: Path, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``x``, ``y`` and the class names of one ``.npz`` file, or :class:`DataFileError`."""
    def fail(found: str) -> DataFileError:
        return DataFileError(f"{path}: expected {NPZ_FORMAT}; found {found}. Replace or delete the file "
                             f"(it is looked for before torchvision's folder)")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - not a zip, truncated, not numpy at all
        raise fail(f"a file numpy cannot read as arrays ({type(err).__name__})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise fail("a single array, not an .npz archive")
    with arrays:
        keys = list(arrays.keys())
        if "x" not in keys or "y" not in keys:
            raise fail(f"the arrays {keys or 'none'}")
        try:
            x, y = arrays["x"], arrays["y"]
            classes = [str(c) for c in arrays["classes"]] if "classes" in keys else _default_classes(name)
        except Exception as err:  # noqa: BLE001 - e.g. object (pickled) arrays, a damaged member
            first = (str(err).splitlines() or [""])[0]
            raise fail(f"arrays that cannot be read without pickle or are damaged ({first})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise fail(f"x {x.dtype} {list(x.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise fail(f"y {y.dtype} {list(y.shape)} for {len(x)} images")
    return x, y, classes


@dataclass
class ArrayDataset:
    """Images as uint8 ``x: [N, 32, 32, 3]`` (HWC, as CIFAR ships them) and labels ``y: [N]``."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    name: str
    source: str = ""
    mean: tuple[float, float, float] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, float, float] = field(default=(0.25, 0.25, 0.25))

    def __post_init__(self):
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] != 3:
            raise ValueError(f"expected x uint8 [N, H, W, 3], got {self.x.dtype} {list(self.x.shape)}")
        self.y = np.asarray(self.y, dtype=np.int64)
        if self.y.shape != (len(self.x),):
            raise ValueError(f"expected y of shape [{len(self.x)}], got {list(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ArrayDataset":
        idx = np.asarray(indices)
        return ArrayDataset(self.x[idx], self.y[idx], self.classes, self.name, self.source, self.mean, self.std)


def make_synthetic(n: int = 2048, num_classes: int = 10, seed: int = 0, size: int = 32) -> ArrayDataset:
    """A learnable stand-in for CIFAR: class k is a stripe pattern with its own orientation,
    frequency and colour, at a random phase, plus noise. Not CIFAR, and never reported as such."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = np.pi * np.arange(num_classes) / num_classes
    freq = 2 * np.pi * (2 + np.arange(num_classes) % 3) / size
    colour = np.random.default_rng(1234).uniform(0.2, 1.0, size=(num_classes, 3)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    proj = np.cos(angle[y])[:, None, None] * xx + np.sin(angle[y])[:, None, None] * yy
    wave = 0.5 + 0.5 * np.sin(freq[y][:, None, None] * proj + phase[:, None, None])
    img = wave[..., None] * colour[y][:, None, None, :] + rng.normal(0, 0.15, size=(n, size, size, 3))
    x = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    mean, std = MEAN_STD["synthetic"]
    return ArrayDataset(x, y, [f"pattern{k}" for k in range(num_classes)], "synthetic", "generated", mean, std)


def load_cifar(name: str, split: str = "train", data_dir: str | Path = "data", download: bool = True,
               synthetic_size: int = 640) -> ArrayDataset:
    """Load ``name`` (``cifar10``, ``cifar100`` or ``synthetic``) and ``split`` (``train``/``test``).

    Looks for ``.npz`` arrays in ``data_dir`` first, then torchvision's folder, downloading it when
    allowed. Raises :class:`DataNotFoundError` with where it looked and how to get the data, and
    :class:`DataFileError` for an ``.npz`` file or a torchvision folder that is there but damaged
    (naming the file or folder, what is wrong, and what to do).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"expected split 'train' or 'test', got {split!r}")
    if name == "synthetic":
        # train and test are drawn from the same distribution with different seeds
        return make_synthetic(synthetic_size if split == "train" else max(synthetic_size // 4, 10),
                              seed=0 if split == "train" else 1)
    mean, std = MEAN_STD[name]
    data_dir = Path(data_dir).expanduser()
    candidates = [data_dir / f"{name}_{split}.npz"]
    if split == "test":
        candidates.append(data_dir / f"{name}_test1000.npz")
    for path in candidates:
        if path.is_file():
            x, y, classes = _read_npz(path, name)
            return ArrayDataset(x, y, classes, name, str(path), mean, std)
    try:
        from torchvision import datasets
    except ImportError as err:  # pragma: no cover - torchvision is a dependency
        raise DataNotFoundError(f"{name}: no .npz in {data_dir} and torchvision is not installed") from err
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = data_dir / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    try:
        ds = cls(root=str(data_dir), train=(split == "train"), download=download and not folder.is_dir())
    except Exception as err:  # torchvision raises RuntimeError (missing) or URLError (offline)
        if folder.is_dir():  # found (or half-extracted just now), but torchvision refused it
            raise DataFileError(
                f"{folder}: torchvision's {name} folder is there but damaged or incomplete "
                f"({_folder_damage(cls, folder, err)}). Delete the folder and run again: it is then "
                f"downloaded afresh{'' if download else ' once downloads are allowed (no --no-download)'}; or put "
                f"arrays {name}_train.npz / {name}_test.npz (x uint8 [N,32,32,3], y int64 [N]) in "
                f"{data_dir}, or use --dataset synthetic.") from None
        how = ("the download failed (offline?)" if download else "download=False")
        raise DataNotFoundError(
            f"{name} ({split}) not found: looked for {', '.join(str(c) for c in candidates)} and for "
            f"torchvision's folder {folder}; {how}. Get it with internet access "
            f"(python -m attn_lib train --dataset {name} downloads it into {data_dir}), or put arrays "
            f"{name}_train.npz / {name}_test.npz (x uint8 [N,32,32,3], y int64 [N]) in {data_dir}, "
            f"or use --dataset synthetic."
        ) from err
    return ArrayDataset(np.asarray(ds.data), np.asarray(ds.targets), list(ds.classes), name, str(folder), mean, std)


def _folder_damage(cls, folder: Path, err: Exception) -> str:
    """Which files of torchvision's CIFAR folder are missing or fail their checksum (torchvision
    checks every one, for either split), else the error that reading them gave."""
    from torchvision.datasets.utils import check_integrity

    bad = []
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = folder / filename
        if not path.is_file():
            bad.append(f"{filename} missing")
        elif not check_integrity(str(path), md5):
            bad.append(f"{filename} fails its checksum")
    if bad:
        return "; ".join(bad)
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"its files cannot be read: {type(err).__name__}" + (f": {first}" if first else "")


def _default_classes(name: str) -> list[str]:
    return CIFAR10_CLASSES if name == "cifar10" else [str(k) for k in range(100)]


def stratified_split(y: np.ndarray, val_size: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split with the same number of validation images per class (±1).

    ``val_size`` is a count (5000 → 500 per class on CIFAR-10) or a fraction. Returns sorted
    ``(train_indices, val_indices)``; the same seed gives the same split on every machine.
    """
    y = np.asarray(y)
    n_val = int(round(val_size * len(y))) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < len(y):
        raise ValueError(f"expected 0 <= val_size < {len(y)}, got {val_size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    # largest-remainder apportionment so the per-class counts add up to n_val exactly
    quota = counts * n_val / len(y)
    take = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - take), kind="stable")[: n_val - take.sum()]:
        take[k] += 1
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)])
    mask = np.zeros(len(y), bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# ----------------------------------------------------------------------------- CPU pipeline
class _TorchvisionDataset(torch.utils.data.Dataset):
    def __init__(self, data: ArrayDataset, train: bool):
        from torchvision.transforms import v2

        self.data = data
        steps = [v2.RandomCrop(32, padding=PAD), v2.RandomHorizontalFlip()] if train else []
        self.transform = v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.data.x[i]).permute(2, 0, 1)  # HWC uint8 -> CHW
        return self.transform(img), int(self.data.y[i])


def dataloader(data: ArrayDataset, batch_size: int, train: bool, workers: int = 2,
               generator: torch.Generator | None = None, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The reference recipe's pipeline: torchvision transforms on the CPU in ``workers`` processes."""
    return torch.utils.data.DataLoader(
        _TorchvisionDataset(data, train), batch_size=batch_size, shuffle=train, drop_last=False,
        num_workers=workers, generator=generator, pin_memory=pin_memory, persistent_workers=False,
    )


# ----------------------------------------------------------------------------- GPU pipeline
class GPULoader:
    """Batches of augmented, normalised images computed on ``device`` from a resident uint8 copy.

    ``for x, y in loader`` yields ``x: [B, 3, 32, 32]`` float32 (channels_last if asked) and
    ``y: [B]`` int64. With ``train=True`` the order is shuffled and each image is cropped at a
    random offset in [0, 8]² of its zero-padded copy and flipped with probability 1/2 — exactly
    the distribution of ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``. Randomness
    comes from ``generator`` (on ``device``) so an epoch is reproducible from its seed.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, train: bool, device: str | torch.device = "cpu",
                 channels_last: bool = False, drop_last: bool = False):
        self.device = torch.device(device)
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.channels_last = channels_last
        pixels = data.x if data.x.flags.writeable else data.x.copy()  # np.load can give read-only arrays
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2)  # [N, 3, H, W] uint8
        self.x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD)) if train else x.contiguous()
        self.y = torch.from_numpy(data.y).to(self.device)
        self.mean = torch.tensor(data.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data.std, device=self.device).view(1, 3, 1, 1) * 255
        self.size = data.x.shape[1]
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def augment(self, idx: torch.Tensor) -> torch.Tensor:
        """Crop and flip the padded images ``idx`` with one gather: ``[B, 3, 32, 32]`` uint8."""
        b, s, g = len(idx), self.size, self.generator
        offset = torch.randint(0, 2 * PAD + 1, (2, b, 1), device=self.device, generator=g)
        flip = torch.rand(b, 1, device=self.device, generator=g) < 0.5
        base = torch.arange(s, device=self.device)
        rows = offset[0] + base  # [B, S]
        cols = offset[1] + torch.where(flip, s - 1 - base, base)  # a flip reverses the column order
        ch = torch.arange(3, device=self.device)
        return self.x[idx[:, None, None, None], ch[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.train else \
            torch.arange(n, device=self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            imgs = self.augment(idx) if self.train else self.x[idx]
            x = (imgs.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[idx]


# ----------------------------------------------------------------------------- for the chapters
def default_data_dir() -> Path:
    """Where the chapters look for data: ``$ATTN_LIB_DATA_DIR`` if set, else ``data/`` at the root
    of the course checkout containing the working directory, else ``./data`` (Colab)."""
    import os

    if os.environ.get("ATTN_LIB_DATA_DIR"):
        return Path(os.environ["ATTN_LIB_DATA_DIR"])
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "attn_lib").is_dir():
            return folder / "data"
    return Path("data")


def cifar10_or_synthetic(split: str = "test", data_dir: str | Path | None = None,
                         download: bool | None = None) -> ArrayDataset:
    """CIFAR-10 when it is on disk (or can be downloaded), else the synthetic stand-in, saying so.

    ``download=None`` downloads only in Colab, so that quick mode never waits on the network.
    """
    import sys

    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    if download is None:
        download = "google.colab" in sys.modules
    try:
        return load_cifar("cifar10", split, data_dir, download=download)
    except DataNotFoundError:
        print(f"CIFAR-10 is not in {data_dir} (and was not downloaded): using the synthetic stand-in; "
              f"the figures below then show stripes, not photographs.")
        return load_cifar("synthetic", split)
