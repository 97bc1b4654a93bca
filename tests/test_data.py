import subprocess
import sys

import numpy as np
import pytest
import torch

from attn_lib.data import (MEAN_STD, ArrayDataset, DataNotFoundError, GPULoader, dataloader, load_cifar,
                           make_synthetic, stratified_split)


def small_npz(tmp_path, name="cifar10", n=60, split="train"):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 10
    np.savez(tmp_path / f"{name}_{split}.npz", x=x, y=y)
    return x, y


def test_npz_is_read_as_is(tmp_path):
    x, y = small_npz(tmp_path)
    ds = load_cifar("cifar10", "train", tmp_path, download=False)
    assert ds.x.dtype == np.uint8 and ds.x.shape == (60, 32, 32, 3)
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.classes[0] == "airplane" and ds.mean == MEAN_STD["cifar10"][0]


def test_test_split_falls_back_to_the_1000_image_file(tmp_path):
    small_npz(tmp_path, split="test1000", n=20)
    assert len(load_cifar("cifar10", "test", tmp_path, download=False)) == 20


def test_cifar100_has_its_own_normalisation(tmp_path):
    small_npz(tmp_path, name="cifar100")
    ds = load_cifar("cifar100", "train", tmp_path, download=False)
    assert ds.mean != MEAN_STD["cifar10"][0]


def test_missing_data_offline_names_where_it_looked(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_cifar("cifar10", "train", tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "cifar10_train.npz") in msg and "cifar-10-batches-py" in msg
    assert "--dataset synthetic" in msg


def test_cli_reports_missing_data_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "attn_lib", "train", "--dataset", "cifar100", "--no-download",
                          "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cifar100 (train) not found" in out.stderr and "Traceback" not in out.stderr


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="expected one of cifar10, cifar100, synthetic"):
        load_cifar("mnist")
    with pytest.raises(ValueError, match="expected split 'train' or 'test'"):
        load_cifar("synthetic", "val")


def test_bad_arrays_are_rejected():
    with pytest.raises(ValueError, match=r"expected x uint8 \[N, H, W, 3\]"):
        ArrayDataset(np.zeros((2, 3, 32, 32), np.float32), np.zeros(2), ["a"], "x")


def test_synthetic_is_deterministic_balanced_and_named_as_such():
    a, b = make_synthetic(200, seed=3), make_synthetic(200, seed=3)
    np.testing.assert_array_equal(a.x, b.x)
    assert np.bincount(a.y).tolist() == [20] * 10
    assert a.name == "synthetic" and all(c.startswith("pattern") for c in a.classes)


def test_synthetic_is_learnable_by_a_linear_probe():
    # class means differ: a nearest-class-mean classifier on raw pixels beats chance by far
    tr, te = make_synthetic(600, seed=0), make_synthetic(200, seed=1)
    feats = lambda d: np.abs(np.fft.fft2(d.x.mean(-1) / 255.0)).reshape(len(d), -1)  # phase-invariant
    means = np.stack([feats(tr)[tr.y == k].mean(0) for k in range(10)])
    pred = ((feats(te)[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == te.y).mean() > 0.5


@pytest.mark.parametrize("val_size", [100, 0.2])
def test_stratified_split_is_balanced_disjoint_and_seeded(val_size):
    y = np.repeat(np.arange(10), 50)
    tr, va = stratified_split(y, val_size, seed=1)
    assert len(va) == 100 and len(tr) == 400 and not set(tr) & set(va)
    assert np.bincount(y[va]).tolist() == [10] * 10
    np.testing.assert_array_equal(va, stratified_split(y, val_size, seed=1)[1])
    assert not np.array_equal(va, stratified_split(y, val_size, seed=2)[1])


def test_stratified_split_uneven_classes_adds_up():
    y = np.array([0] * 70 + [1] * 20 + [2] * 10)
    tr, va = stratified_split(y, 13, seed=0)
    assert len(va) == 13 and np.bincount(y[va]).tolist() == [9, 3, 1]


def _candidates(img: np.ndarray, mean, std) -> torch.Tensor:
    """All 81 crops x 2 flips of one image, normalised: the support of the augmentation."""
    t = torch.from_numpy(img).permute(2, 0, 1).float()
    p = torch.nn.functional.pad(t, (4, 4, 4, 4))
    crops = torch.stack([p[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)])
    crops = torch.cat([crops, crops.flip(-1)])
    m, s = torch.tensor(mean).view(1, 3, 1, 1) * 255, torch.tensor(std).view(1, 3, 1, 1) * 255
    return (crops - m) / s


def _which(sample: torch.Tensor, cands: torch.Tensor) -> int:
    d = (cands - sample).flatten(1).abs().amax(1)
    k = int(d.argmin())
    assert d[k] < 1e-4, "the sample is not a crop/flip of its image"
    return k


def test_gpu_and_cpu_pipelines_draw_from_the_same_distribution():
    data = make_synthetic(1, seed=5)
    repeated = data.subset(np.zeros(1620, dtype=int))  # one image, many draws
    cands = _candidates(data.x[0], data.mean, data.std)
    counts = {}
    gpu = GPULoader(repeated, 540, train=True)
    gpu.generator = torch.Generator().manual_seed(0)
    counts["gpu"] = np.bincount([_which(s, cands) for x, _ in gpu for s in x], minlength=162)
    cpu = dataloader(repeated, 540, train=True, workers=0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    counts["cpu"] = np.bincount([_which(s, cands) for x, _ in cpu for s in x], minlength=162)
    for name, c in counts.items():
        # 162 equally likely outcomes, 1620 draws: every one appears and a chi-square test passes
        assert c.sum() == 1620 and (c > 0).sum() >= 150, name
        chi2 = ((c - 10) ** 2 / 10).sum()
        assert chi2 < 240, f"{name}: chi2 {chi2:.0f} over 161 dof"  # p ~ 1e-4
    # flips: about half of each
    for c in counts.values():
        assert 0.4 < c[81:].sum() / c.sum() < 0.6


def test_eval_pipelines_agree_exactly():
    data = make_synthetic(50, seed=2)
    gx = torch.cat([x for x, _ in GPULoader(data, 16, train=False)])
    cx = torch.cat([x for x, _ in dataloader(data, 16, train=False, workers=0)])
    torch.testing.assert_close(gx, cx)


def test_gpu_loader_epoch_covers_each_image_once_and_channels_last():
    data = make_synthetic(100, seed=2)
    loader = GPULoader(data, 32, train=True, channels_last=True)
    loader.generator = torch.Generator().manual_seed(0)
    ys = torch.cat([y for _, y in loader])
    assert len(ys) == 100 and sorted(ys.tolist()) == sorted(data.y.tolist())
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    loader.drop_last = True
    assert len(loader) == 3


def test_real_cifar10_is_normalised_by_its_statistics(shared_cifar):
    from PIL import Image

    x = np.asarray(Image.open(shared_cifar / "cifar10_batch_0.png").convert("RGB")).reshape(1000, 32, 32, 3)
    data = ArrayDataset(x, np.zeros(1000, np.int64), ["?"], "cifar10", "sprite", *MEAN_STD["cifar10"])
    batch = next(iter(GPULoader(data, 1000, train=False)))[0]
    mean, std = batch.mean((0, 2, 3)), batch.std((0, 2, 3))
    assert mean.abs().max() < 0.05 and (std - 1).abs().max() < 0.05


def test_a_damaged_array_file_names_itself_and_the_format(tmp_path):
    from attn_lib.data import DataFileError, load_cifar

    path = tmp_path / "cifar10_train.npz"
    np.savez(path, x=np.zeros((4, 32, 32), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataFileError, match=r"cifar10_train.npz: expected an .npz array file with x uint8 "
                                            r"\[N, 32, 32, 3\] and y int64 \[N\].*found x uint8 \[4, 32, 32\]"):
        load_cifar("cifar10", "train", tmp_path, download=False)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataFileError, match="found a file numpy cannot read as arrays"):
        load_cifar("cifar10", "train", tmp_path, download=False)


@pytest.mark.parametrize("name, folder_name, files, missing", [
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_2", "test_batch", "batches.meta"], "data_batch_3"),
    ("cifar100", "cifar-100-python", ["train", "meta"], "test"),
])
def test_a_damaged_torchvision_folder_names_itself_and_what_is_wrong(tmp_path, monkeypatch, name, folder_name,
                                                                     files, missing):
    """Junk batch files (and some missing): the folder is named with each bad file, and deleting it
    is the way to a fresh download; no download is tried meanwhile, and nothing says "offline"."""
    import torchvision.datasets.cifar as tv_cifar

    from attn_lib.data import DataFileError

    folder = tmp_path / folder_name
    folder.mkdir()
    for file in files:
        (folder / file).write_bytes(b"junk, not a pickled batch")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    for download in (True, False):
        with pytest.raises(DataFileError) as err:
            load_cifar(name, "train", tmp_path, download=download)
        msg = str(err.value)
        assert msg.startswith(f"{folder}: torchvision's {name} folder is there but damaged or incomplete")
        assert f"{files[0]} fails its checksum" in msg and "Delete the folder and run again" in msg
        assert "downloaded afresh" in msg and "offline" not in msg and "not found" not in msg
        assert f"{name}_train.npz" in msg and "--dataset synthetic" in msg and f"{missing} missing" in msg


def test_a_chapter_does_not_call_a_damaged_folder_missing(tmp_path, capsys):
    from attn_lib import course
    from attn_lib.data import DataFileError

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(DataFileError, match="damaged or incomplete"):
        course.chapter_data("test", tmp_path)
    assert "no network" not in capsys.readouterr().out
