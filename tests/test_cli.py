import json
import subprocess
import sys

import pytest

from attn_lib.cli import main


def test_help_reads_well():
    out = subprocess.run([sys.executable, "-m", "attn_lib", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--dataset", "--attention", "--preset", "--resume", "--out", "--no-download"):
        assert flag in out.stdout


def test_train_smoke_and_resume(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--epochs", "2", "--device", "cpu", "--batch-size", "64",
            "--train-subset", "256", "--val-size", "64", "-o", "width=8", "--attention", "se", "-o", "reduction=4",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args + ["--stop-after", "1"]) == 0
    assert len(json.loads((tmp_path / "history.json").read_text())["epochs"]) == 1
    assert main(args + ["--resume"]) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert history["config"]["model_kwargs"] == {"width": 8, "reduction": 4}
    assert history["meta"]["command"].startswith("python -m attn_lib train --dataset synthetic")
    assert (tmp_path / "checkpoint.pt").is_file()


def test_bad_option_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--dataset", "synthetic", "--device", "cpu", "--attention", "se", "-o", "reduction=1000",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "reduction 1000 leaves" in capsys.readouterr().err


def test_unknown_attention_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--attention", "transformer", "--out", "x"])
    assert "invalid choice: 'transformer'" in capsys.readouterr().err


def test_the_smoke_command_visibly_learns(tmp_path, capsys):
    """The documented smoke run, ``train --dataset synthetic --epochs 2``, ends well above chance
    (10%) with a sane validation loss. Here at width 8 on the CPU, so that the test takes seconds
    (the recipe, batch and lr are the command's own; the full-width run is too slow for a test
    on a CPU)."""
    out = tmp_path / "smoke"
    assert main(["train", "--dataset", "synthetic", "--epochs", "2", "--out", str(out), "--no-progress",
                 "--device", "cpu", "-o", "width=8"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["batch_size"] == 64 and history["config"]["lr"] == 0.05
    last = history["epochs"][-1]
    assert last["val_top1"] > 30.0 and last["val_loss"] < 2.3, last  # chance: 10%, loss ln 10 = 2.30


def test_preset_seed_still_works_with_a_note(capsys):
    parser_args = ["train", "--preset", "seed", "--epochs", "0", "--dataset", "synthetic", "--out", "x"]
    assert main(parser_args) == 2
    err = capsys.readouterr().err
    assert "note: --preset " + "seed is the old name of --preset reference" in err
    assert "error: --epochs 0: expected an integer >= 1" in err


def test_compile_can_be_turned_off():
    from attn_lib.cli import build_parser

    args = build_parser().parse_args(["train", "--no-compile", "--out", "x"])
    assert args.compile is False
    assert build_parser().parse_args(["train", "--out", "x"]).compile is None  # the preset's: auto


def test_resume_help_mentions_the_fallback():
    from attn_lib.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    assert "OUT/checkpoint-prev.pt (one epoch trained again, with a warning" in text
    assert "moved aside to OUT/checkpoint.pt.damaged" in text


def test_a_bug_mid_training_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the project's own input errors become a one-line exit 2: a ValueError from inside
    training is a bug, and must not be reported as "nothing trained, nothing written"."""
    import attn_lib.train as train_mod

    def broken(*args, **kwargs):
        raise ValueError("a bug in evaluation")

    monkeypatch.setattr(train_mod, "evaluate", broken)
    with pytest.raises(ValueError, match="a bug in evaluation"):
        main(["train", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu", "--train-subset", "128",
              "--val-size", "64", "-o", "width=8", "--out", str(tmp_path / "run"), "--no-progress"])


def test_input_errors_are_still_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_text("not a checkpoint")
    code = main(["train", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu", "-o", "width=8",
                 "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a checkpoint file" in err
    assert "weights_only" not in err
