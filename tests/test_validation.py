"""Bad input never passes silently: every wrong option or file gives one clear line and exit 2,
with no traceback and nothing written; the chapters' entry points raise one clear exception."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attn_lib import course, results
from attn_lib.cli import main
from attn_lib.inspect import collect_attention, grad_cam
from attn_lib.models import resnet18
from attn_lib.train import ConfigError, TrainConfig

TINY = ["--dataset", "synthetic", "--device", "cpu", "--no-progress", "-o", "width=8"]


def run_cli(args, out, capsys):
    """Exit status and stderr of ``python -m attn_lib train ARGS --out OUT`` (in process: an
    exception would fail the test with its traceback)."""
    try:
        code = main(["train", *args, "--out", str(out)])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


# Each row: the options, then what the single error line must contain (the option or file and
# what is allowed).
ROWS = {
    "batch size 0": (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    "negative epochs": (["--epochs", "-1"], "--epochs -1: expected an integer >= 1"),
    "zero epochs": (["--epochs", "0"], "--epochs 0: expected an integer >= 1"),
    "nan lr": (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    "infinite lr": (["--lr", "inf"], "--lr inf: expected a finite number > 0"),
    "zero lr": (["--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    "val size beyond the data": (["--val-size", "60000"],
                                 "--val-size 60000: expected 0 to 639 (the synthetic training set has 640"),
    "negative val size": (["--val-size", "-5"], "--val-size -5: expected an integer >= 0"),
    "subset 0": (["--train-subset", "0"], "--train-subset 0: expected an integer >= 1"),
    "subset beyond the data": (["--train-subset", "100000"], "--train-subset 100000: expected 1 to 640"),
    "val size beyond the subset": (["--train-subset", "100", "--val-size", "100"],
                                   "--val-size 100: expected 0 to 99"),
    "batch larger than the training images": (["--batch-size", "600"],
                                              "--batch-size 600: expected at most 512"),
    "unknown device": (["--device", "tpu"], "--device 'tpu': expected device cpu, cuda, mps or auto"),
    "negative seed": (["--seed", "-1"], "--seed -1: expected an integer from 0 to 4294967295 (2**32 - 1)"),
    # beyond 2**32 - 1 the per-epoch generator's seed (seed * 100003 + epoch) could pass 64 bits
    "seed beyond 64 bits": (["--seed", str(2**64)],
                            f"--seed {2**64}: expected an integer from 0 to 4294967295 (2**32 - 1)"),
    "seed whose epoch seeds pass 64 bits": (["--seed", "200000000000000"],
                                            "--seed 200000000000000: expected an integer from 0 to 4294967295"),
    "stop after 0": (["--stop-after", "0"], "--stop-after 0: expected an integer >= 1"),
    "bad model option": (["-o", "width=0"], "-o width=0: expected width to be a positive integer"),
    "option without attention": (["-o", "reduction=4"], "attention options ['reduction'] given without an attention"),
}


@pytest.mark.parametrize("args, message", ROWS.values(), ids=ROWS.keys())
def test_each_bad_option_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = run_cli(TINY + args, out, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_several_problems_are_all_listed_one_line_each(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(TINY + ["--batch-size", "0", "--epochs", "0", "--lr", "nan"], out, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 3 and not out.exists()
    assert all(flag in err for flag in ("--batch-size 0", "--epochs 0", "--lr nan"))


def test_a_wrong_type_is_refused_by_the_parser(tmp_path, capsys):
    code, err = run_cli(TINY + ["--batch-size", "abc"], tmp_path / "run", capsys)
    assert code == 2 and "--batch-size: invalid int value: 'abc'" in err and not (tmp_path / "run").exists()


def _npz_not_arrays(path):
    path.write_text("this is not an array file\n")


def _npz_pickled(path):
    np.savez(path, x=np.array([object()], dtype=object), y=np.zeros(1))


def _npz_wrong_shape(path):
    np.savez(path, x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))


def _npz_wrong_labels(path):
    np.savez(path, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(3, np.int64))


def _npz_missing_y(path):
    np.savez(path, images=np.zeros((4, 32, 32, 3), np.uint8))


DATA_FILES = {
    "not an array file": (_npz_not_arrays, "a file numpy cannot read as arrays"),
    "pickled arrays": (_npz_pickled, "cannot be read without pickle"),
    "wrong image shape": (_npz_wrong_shape, "found x uint8 [4, 28, 28]"),
    "labels of another length": (_npz_wrong_labels, "found y int64 [3] for 4 images"),
    "arrays under other names": (_npz_missing_y, "found the arrays ['images']"),
}


@pytest.mark.parametrize("write, found", DATA_FILES.values(), ids=DATA_FILES.keys())
def test_an_unreadable_data_file_is_named_with_the_expected_format(tmp_path, capsys, write, found):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "cifar10_train.npz"
    write(path)
    out = tmp_path / "run"
    code, err = run_cli(["--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--device", "cpu"],
                        out, capsys)
    assert code == 2 and "Traceback" not in err and not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], err
    assert "x uint8 [N, 32, 32, 3] and y int64 [N]" in lines[0] and found in lines[0], err


def _junk_folder(data):
    folder = data / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "batches.meta"):
        (folder / name).write_bytes(b"not a CIFAR batch")
    return folder


@pytest.mark.parametrize("download", [True, False], ids=["download allowed", "no download"])
def test_a_damaged_torchvision_folder_is_named_not_reported_missing(tmp_path, capsys, download):
    data = tmp_path / "data"
    folder = _junk_folder(data)
    out = tmp_path / "run"
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--device", "cpu", "--no-progress"]
    code, err = run_cli(args + ([] if download else ["--no-download"]), out, capsys)
    assert code == 2 and "Traceback" not in err and not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}: "), err
    assert "damaged or incomplete" in lines[0] and "data_batch_1 fails its checksum" in lines[0], err
    assert "test_batch missing" in lines[0] and "Delete the folder" in lines[0], err
    assert "not found" not in lines[0] and "offline" not in lines[0], err


def test_a_truncated_checkpoint_without_a_previous_one_names_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--epochs", "2", "--train-subset", "128", "--val-size", "0"]
    assert run_cli(args + ["--stop-after", "1"], out, capsys)[0] == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = sorted(p.name for p in out.iterdir())
    code, err = run_cli(args + ["--resume"], out, capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0] and "delete it" in lines[0], err
    assert "damaged or truncated" in lines[0] and "weights_only" not in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_damaged_latest_checkpoint_falls_back_with_one_warning_line(tmp_path, capsys, monkeypatch):
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # Python's own, past pytest's catcher
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    out = tmp_path / "run"
    args = TINY + ["--epochs", "3", "--train-subset", "128", "--val-size", "0"]
    assert run_cli(args + ["--stop-after", "2"], out, capsys)[0] == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(b"")
    code, err = run_cli(args + ["--resume"], out, capsys)
    assert code == 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {ckpt} cannot be read: the file is empty"), err
    assert "moved aside to checkpoint.pt.damaged" in lines[0] and str(out / "checkpoint-prev.pt") in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-prev.pt", "checkpoint.pt", "checkpoint.pt.damaged",
                                                     "history.json"]


def test_the_cli_itself_exits_2_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "attn_lib", "train", "--dataset", "synthetic", "--batch-size", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: --batch-size 0: expected an integer >= 1"
    assert not out.exists()


# --------------------------------------------------------------------------- TrainConfig, directly
CONFIG_RULES = {
    "epochs": 0, "batch_size": -3, "lr": float("nan"), "momentum": 1.0, "weight_decay": -1e-4, "gamma": 0.0,
    "warmup_epochs": float("inf"), "warmup_fraction": 1.5, "label_smoothing": 1.0, "workers": -1,
    "val_size": 2.5, "train_subset": 0, "seed": "0", "split_seed": -1, "milestones": (120, 80),
    "schedule": "linear", "pipeline": "tpu", "dataset": "mnist", "model": "vgg", "attention": "transformer",
    "compile": "yes", "amp": "no", "device": "gpu", "model_kwargs": ["width", 8],
}


@pytest.mark.parametrize("name, value", CONFIG_RULES.items(), ids=CONFIG_RULES.keys())
def test_train_config_names_each_bad_field(name, value, tmp_path):
    cfg = TrainConfig.from_preset("fast", **{"dataset": "synthetic", "device": "cpu", name: value})
    problems = cfg.problems()
    assert len(problems) == 1 and problems[0].startswith(f"{name} ") and "expected" in problems[0], problems
    with pytest.raises(ConfigError) as err:
        cfg.check()
    assert err.value.problems == problems
    from attn_lib.train import fit

    with pytest.raises(ConfigError):
        fit(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_the_presets_are_valid():
    from attn_lib.train import PRESETS

    for name in PRESETS:
        assert TrainConfig.from_preset(name, device="cpu").problems() == []


# --------------------------------------------------------------------------- chapters' entry points
def _grad_cam_target(target):
    model = resnet18(10, width=16)
    return grad_cam(model, torch.zeros(2, 3, 32, 32), model.layer4, target)


ENTRY_POINTS = {
    "load with a number": (lambda: results.load(3), TypeError, "expected the name of a recorded result"),
    "load an unknown name": (lambda: results.load("nope"), FileNotFoundError, "no recorded result 'nope'"),
    "load_runs with a list": (lambda: results.load_runs(["cifar10-h200-r18"]), TypeError,
                              "expected a group name"),
    "load_runs unknown group": (lambda: results.load_runs("cifar99"), FileNotFoundError, "groups:"),
    "load_histories with None": (lambda: results.load_histories(None), TypeError, "expected a group name"),
    "load_trained unknown attention": (lambda: results.load_trained("cifar10-cpu-w16", "transformer"),
                                       FileNotFoundError, "recorded for cifar10-cpu-w16:"),
    "load_trained without weights": (lambda: results.load_trained("cifar10-h200-r18", "se"), FileNotFoundError,
                                     "no weights"),
    "summarise a non-history": (lambda: results.summarise({"epochs": []}), ValueError,
                                "expected a training history"),
    "commit_label of a string": (lambda: results.commit_label("abc"), TypeError, "expected a history's meta"),
    "collect_attention with a non-model": (lambda: collect_attention("resnet18", torch.zeros(1, 3, 32, 32)),
                                           TypeError, "expected an nn.Module"),
    "collect_attention with a numpy image": (lambda: collect_attention(resnet18(10, "se", width=16),
                                                                       np.zeros((1, 3, 32, 32))),
                                             TypeError, "expected x as a torch.Tensor"),
    "collect_attention with one image, unbatched": (lambda: collect_attention(resnet18(10, "se", width=16),
                                                                              torch.zeros(3, 32, 32)),
                                                    ValueError, r"expected x of shape \[B, 3, H, W\]"),
    "collect_attention with HWC images": (lambda: collect_attention(resnet18(10, "se", width=16),
                                                                    torch.zeros(2, 32, 32, 3)),
                                          ValueError, r"expected x of shape \[B, 3, H, W\]"),
    "collect_attention with uint8 images": (lambda: collect_attention(resnet18(10, "se", width=16),
                                                                      torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
                                            TypeError, "floating-point"),
    "grad_cam with a layer not in the model": (lambda: grad_cam(resnet18(10, width=16), torch.zeros(1, 3, 32, 32),
                                                                torch.nn.Conv2d(3, 3, 1)),
                                               ValueError, "is not a module of the model"),
    "grad_cam with a wrong target": (lambda: _grad_cam_target(torch.tensor([1, 2, 3])), ValueError,
                                     r"expected target of shape \[2\]"),
    "grad_cam with a class that does not exist": (lambda: _grad_cam_target(torch.tensor([1, 10])), ValueError,
                                                  "class indices in 0..9"),
    "predict with a model's name": (lambda: course.predict("resnet18", _images()), TypeError,
                                    r"predict: expected model as a network \(an nn.Module\), got str 'resnet18'"),
    "predict with a tensor of images": (lambda: course.predict(_net(), torch.zeros(2, 3, 32, 32)), TypeError,
                                        "predict: expected data as an ArrayDataset .* got Tensor: pass the "
                                        "dataset itself"),
    "predict with batch size 0": (lambda: course.predict(_net(), _images(), batch_size=0), ValueError,
                                  "predict: expected batch_size >= 1, got 0"),
    "predict with a string batch size": (lambda: course.predict(_net(), _images(), batch_size="64"), TypeError,
                                         "predict: expected batch_size as an integer >= 1, got str '64'"),
    "predict with tta as a string": (lambda: course.predict(_net(), _images(), tta="no"), TypeError,
                                     "predict: expected tta as True or False, got str 'no'"),
    "normalised_images of an array": (lambda: course.normalised_images(np.zeros((2, 32, 32, 3), np.uint8)),
                                      TypeError, "normalised_images: expected data as an ArrayDataset .* got "
                                                 "ndarray"),
    "normalised_images of one index": (lambda: course.normalised_images(_images(), 3), TypeError,
                                       r"normalised_images: expected indices as a slice or a list .*\[i\]"),
    "train_or_load with no names": (lambda: course.train_or_load("02_se", None, full=False,
                                                                 recorded="cifar10-h200-r18"), TypeError,
                                    r"train_or_load: expected names as a list such as \['none', 'se'\], got "
                                    "NoneType"),
    "train_or_load with one name as a string": (lambda: course.train_or_load("02_se", "se", full=False,
                                                                             recorded="cifar10-h200-r18"),
                                                TypeError, "expected a list of attention names, got the string"),
    "train_or_load with a name that is not a string": (lambda: course.train_or_load(
        "02_se", ["none", None], full=False, recorded="cifar10-h200-r18"), TypeError, "but it holds NoneType"),
    "train_or_load with one seed as a number": (lambda: course.train_or_load("02_se", ["se"], full=False,
                                                                             recorded="cifar10-h200-r18", seeds=0),
                                                TypeError, r"expected seeds as a list such as \(0, 1, 2\), got int 0"),
    "train_or_load with seeds as strings": (lambda: course.train_or_load("02_se", ["se"], full=False,
                                                                         recorded="cifar10-h200-r18", seeds="012"),
                                            TypeError, "expected seeds as a list .* got the string '012'"),
    "train_or_load with a negative seed": (lambda: course.train_or_load("02_se", ["se"], full=False,
                                                                        recorded="cifar10-h200-r18", seeds=[-1]),
                                           ValueError, r"expected seeds >= 0, got \[-1\]"),
    "train_or_load with no seeds": (lambda: course.train_or_load("02_se", ["se"], full=False,
                                                                 recorded="cifar10-h200-r18", seeds=[]),
                                    ValueError, "expected at least one item in seeds"),
    "train_or_load with full as a string": (lambda: course.train_or_load("02_se", ["se"], full="False",
                                                                         recorded="cifar10-h200-r18"),
                                            TypeError, "train_or_load: expected full as True or False, got str"),
    "train_or_load with overrides as a list": (lambda: course.train_or_load(
        "02_se", ["se"], full=False, recorded="cifar10-h200-r18", overrides=[("epochs", 5)]), TypeError,
        "expected overrides as a dict of options"),
    "step_seconds with a model's name": (lambda: course.step_seconds("resnet18"), TypeError,
                                         "step_seconds: expected model as a network .* build the network first"),
    "step_seconds with a float batch": (lambda: course.step_seconds(_net(), batch=2.5), TypeError,
                                        "step_seconds: expected batch as an integer >= 1, got float 2.5"),
    "model_cost of a name": (lambda: course.model_cost("resnet18"), TypeError,
                             "model_cost: expected model as a network"),
    "step_time_ratios of a list": (lambda: course.step_time_ratios([_net()]), TypeError,
                                   "step_time_ratios: expected models as a dict"),
    "cmp of a list": (lambda: course.cmp("gates", [1.0], torch.ones(1)), TypeError,
                      r"cmp\('gates'\): expected got as a torch.Tensor, got list"),
}


def _net():
    return resnet18(10, width=8)


def _images():
    from attn_lib.data import make_synthetic

    return make_synthetic(4)


@pytest.mark.parametrize("call, error, message", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_entry_points_raise_one_clear_exception(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- checkers' arguments
from attn_lib.exercises.report import expect_arguments  # noqa: E402
from attn_lib.modules.se import SqueezeExcitation  # noqa: E402

CHECKER_ARGUMENTS = {
    "an instance instead of the class": (dict(cls=SqueezeExcitation(32)), TypeError,
                                         "expected the class itself, got an instance of SqueezeExcitation"),
    "a string instead of a class": (dict(cls="SqueezeExcitation"), TypeError, "expected a class to build"),
    "a number instead of a function": (dict(fn=3), TypeError, "expected a function, got int 3"),
    "channels as a string": (dict(cls=SqueezeExcitation, channels="32"), TypeError,
                             "expected channels as an integer, got str '32'"),
    "reduction zero": (dict(cls=SqueezeExcitation, reduction=0), ValueError, "expected reduction >= 1, got 0"),
    "a size as True": (dict(cls=SqueezeExcitation, channels=True), TypeError,
                       "expected channels as an integer, got bool True"),
}


@pytest.mark.parametrize("kwargs, error, message", CHECKER_ARGUMENTS.values(), ids=CHECKER_ARGUMENTS.keys())
def test_checker_arguments_raise_one_clear_exception(kwargs, error, message):
    with pytest.raises(error, match=f"check_squeeze_excitation: {message}"):
        expect_arguments("check_squeeze_excitation", **kwargs)


def test_right_checker_arguments_pass():
    expect_arguments("check_squeeze_excitation", cls=SqueezeExcitation, channels=32, reduction=8,
                     flags={"official": True})
    expect_arguments("check_accuracy", fn=lambda logits, target, k: 0.0)
    expect_arguments("check_paired_interval", fn=len, reals={"confidence": 0.9})
    expect_arguments("check_training_step", fn=len, reals={"aux_weight": 0}, flags={"official": False})


REAL_AND_FLAG_ARGUMENTS = {
    "confidence of 1.5": (dict(reals={"confidence": 1.5}), ValueError,
                          "expected confidence as a finite number strictly between 0 and 1, e.g. 0.95, got 1.5"),
    "confidence as a string": (dict(reals={"confidence": "0.95"}), TypeError, "got str '0.95'"),
    "confidence nan": (dict(reals={"confidence": float("nan")}), ValueError, "got nan"),
    "a weight as True": (dict(reals={"aux_weight": True}), TypeError, "expected aux_weight as a finite number"),
    "a negative weight": (dict(reals={"aux_weight": -0.5}), ValueError, "expected aux_weight as a finite number >= 0"),
    "a flag as a string": (dict(flags={"official": "yes"}), TypeError,
                           "expected official as True or False, got str 'yes'"),
    "a flag as 1": (dict(flags={"official": 1}), TypeError, "expected official as True or False, got int 1"),
}


@pytest.mark.parametrize("kwargs, error, message", REAL_AND_FLAG_ARGUMENTS.values(),
                         ids=REAL_AND_FLAG_ARGUMENTS.keys())
def test_real_and_flag_arguments_raise_one_clear_exception(kwargs, error, message):
    with pytest.raises(error) as err:
        expect_arguments("check_x", **kwargs)
    assert str(err.value).startswith("check_x: expected ") and message in str(err.value), err.value
