"""``python -m attn_lib``: train a model, or benchmark the pipelines and the modules.

    python -m attn_lib train --dataset cifar10 --model resnet18 --attention se --out runs/se
    python -m attn_lib train --dataset synthetic --epochs 2 --out runs/smoke
    python -m attn_lib bench train
    python -m attn_lib bench modules
    python -m attn_lib bench danet
    python -m attn_lib chapter run 05_danet --full
    python -m attn_lib classroom export handout/
    python -m attn_lib classroom grade submissions/ --out grades.csv
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings

from .registry import available_attentions


def _kv(text: str):
    """``key=value`` with a JSON value where it parses (``reduction=8``, ``cam="official"``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import MODELS
    from .train import PRESET_ALIASES, PRESETS, SYNTHETIC_BATCH_SIZE, SYNTHETIC_LR

    parser = argparse.ArgumentParser(prog="python -m attn_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a backbone, with or without attention",
                       description="Train on CIFAR (or the synthetic stand-in). Writes OUT/history.json "
                                   "and OUT/checkpoint.pt after every epoch (the previous epoch's is kept as "
                                   "OUT/checkpoint-prev.pt); --resume continues a stopped run exactly where it "
                                   "left off.")
    t.add_argument("--dataset", choices=DATASETS, default="cifar10")
    t.add_argument("--data-dir", default="data", help="where the data is or goes (default: data)")
    t.add_argument("--no-download", action="store_true", help="fail with a clear message instead of downloading")
    t.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    t.add_argument("--attention", choices=available_attentions() + ["triple"], default=None,
                   help="attention mechanism placed where its paper puts it (default: none)")
    t.add_argument("--option", "-o", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="model/attention option, repeatable: -o width=32 -o reduction=8")
    t.add_argument("--preset", choices=sorted(PRESETS) + sorted(PRESET_ALIASES), default="fast",
                   metavar="{fast,reference}",
                   help="fast (default): data on the GPU, bf16, one-cycle, compiled on CUDA; reference: the "
                        "160-epoch recipe of a widely reposted training script (old name: seed)")
    t.add_argument("--epochs", type=int, help="override the preset's epochs (at least 1)")
    t.add_argument("--batch-size", type=int,
                   help=f"override the preset's batch size (default on --dataset synthetic: {SYNTHETIC_BATCH_SIZE})")
    t.add_argument("--lr", type=float, help=f"override the preset's (peak) learning rate (positive; default on "
                                            f"--dataset synthetic: {SYNTHETIC_LR})")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA with the fast preset; a model that fails "
                        "to compile trains eagerly, with a warning)")
    t.add_argument("--val-size", type=int,
                   help="images held out from training for validation (default 5000, or a fifth of a smaller set)")
    t.add_argument("--train-subset", type=int, help="train on the first N training images only")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    t.add_argument("--out", required=True, help="output directory for history.json and checkpoint.pt")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists; if that file is damaged, from "
                        "OUT/checkpoint-prev.pt (one epoch trained again, with a warning; the damaged file "
                        "is moved aside to OUT/checkpoint.pt.damaged)")
    t.add_argument("--stop-after", type=int, metavar="EPOCH", help="stop after this epoch (continue with --resume)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    b = sub.add_parser("bench", help="measure speed (a benchmark, not a test)",
                       description="Benchmarks write a JSON results file with the command, commit, device and seed.")
    b.add_argument("what", choices=["train", "modules", "danet"],
                   help="train: reference vs fast pipeline img/s and MFU; modules: cost of each mechanism; "
                        "danet: DANet position attention, explicit vs fused, 8x8 to 128x128")
    b.add_argument("--device", default="auto")
    b.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    b.add_argument("--out", default=None, help="results file (default: printed only)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure compiled models (default: on CUDA, not on the CPU, where compiling "
                        "every model takes minutes)")
    c = sub.add_parser("chapter", help="run a chapter as a script, without Jupyter",
                       description="Run a chapter's code cells in order, as a script (figures off-screen). "
                                   "Full mode writes its runs to runs/<chapter>/ as the notebook does; "
                                   "ATTN_LIB_TOY=1 runs full mode at toy size.")
    c.add_argument("action", choices=["run", "list", "time"],
                   help="run one chapter; list them; time every chapter's quick mode into a results file")
    c.add_argument("name", nargs="?", default=None, help="chapter: 05_danet, 05 or 5")
    c.add_argument("--full", action="store_true", help="full mode (FULL = True): train for real")
    c.add_argument("--json-out", help="run: also write the time and the runs full mode trains as JSON")
    c.add_argument("--out", help="time: the results file to write")
    c.add_argument("--table", help="time: also write the Markdown table for the teachers' page")
    k = sub.add_parser("classroom", help="student versions of the chapters, and grading",
                       description="export: write every chapter without its solution cells (or, with "
                                   "--keep-solutions, the teacher's copy). grade: run the exercises of every "
                                   "submitted notebook in a fresh process with a time limit and write one CSV "
                                   "row per student and exercise, plus a Markdown report beside it.")
    k.add_argument("action", choices=["export", "grade"])
    k.add_argument("path", help="export: the folder to write; grade: the folder of submissions "
                                "(one notebook or one folder per student)")
    k.add_argument("--chapters", nargs="+", metavar="CHAPTER", help="export only these (e.g. 02 05_danet)")
    k.add_argument("--keep-solutions", action="store_true", help="export the teacher's copy, solutions kept")
    k.add_argument("--out", default="grades.csv", help="grade: the CSV to write (default grades.csv)")
    k.add_argument("--time-limit", type=float, default=300.0, metavar="SECONDS",
                   help="grade: time allowed per notebook (default 300)")
    k.add_argument("--workers", type=int, default=1, help="grade: notebooks graded at once (default 1)")
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m attn_lib " + shlex.join(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _warning_line  # one plain line per warning, no source line
    try:
        if args.command == "train":
            return _train(args, command)
        if args.command == "chapter":
            from . import chapters

            args.command_line = command
            if args.action == "run" and args.name is None:
                print("error: chapter run needs a chapter name (python -m attn_lib chapter list)",
                      file=sys.stderr)
                return 2
            return chapters.main(args)
        if args.command == "classroom":
            from . import classroom

            return classroom.main(args)
        return _bench(args, command)
    finally:
        warnings.formatwarning = formatwarning


def _train(args, command: str) -> int:
    """Exit status 0: trained; 2: an option, a data file or the run directory is wrong (nothing
    trained, nothing written); 1: training stopped (diverged, out of memory)."""
    from .data import DataFileError, DataNotFoundError
    from .train import (PRESET_ALIASES, CheckpointError, ConfigError, TrainConfig, TrainingDiverged,
                        TrainingOutOfMemory, fit)

    if args.preset in PRESET_ALIASES:
        print(f"note: --preset {args.preset} is the old name of --preset {PRESET_ALIASES[args.preset]}",
              file=sys.stderr)
    problems = [f"--option {key}: expected a name (KEY=VALUE)" for key, _ in args.option if not key.isidentifier()]
    if args.stop_after is not None and args.stop_after < 1:
        problems.append(f"--stop-after {args.stop_after}: expected an integer >= 1")
    try:
        cfg = TrainConfig.from_preset(
            args.preset, dataset=args.dataset, data_dir=args.data_dir, download=not args.no_download,
            model=args.model, attention=args.attention, model_kwargs=dict(args.option), epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, compile=args.compile, val_size=args.val_size,
            train_subset=args.train_subset, seed=args.seed, device=args.device)
        problems += cfg.problems(cli=True)
        if problems:
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
            return 2
        fit(cfg, args.out, resume=args.resume, progress=not args.no_progress, stop_after=args.stop_after,
            command=command, cli=True)
    except (ConfigError, DataNotFoundError, DataFileError, CheckpointError) as err:
        # only the project's own input errors: any other exception is a bug and keeps its traceback
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (TrainingDiverged, TrainingOutOfMemory) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/history.json and {args.out}/checkpoint.pt")
    return 0


def _bench(args, command: str) -> int:
    from . import bench

    if args.steps is not None and args.steps < 1:
        print(f"error: --steps {args.steps}: expected an integer >= 1", file=sys.stderr)
        return 2
    try:
        results = bench.run(args.what, device=args.device, steps=args.steps, seed=args.seed,
                            compile=args.compile, command=command)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=1)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(bench.summary(results))
    return 0
