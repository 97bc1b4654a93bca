import json
import math

import pytest
import torch

import attn_lib.train as train_mod
from attn_lib.train import (PRESETS, CheckpointError, TrainConfig, TrainingDiverged, TrainingOutOfMemory, accuracy,
                             amp_choice, fit, load_checkpoint, lr_factor)


def strip(history):
    """The epochs of a history without their timings."""
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history["epochs"]]


def tiny(**overrides) -> TrainConfig:
    """ResNet-18 at width 8 on the synthetic set: seconds on a CPU."""
    base = dict(dataset="synthetic", device="cpu", epochs=2, batch_size=64, val_size=64, train_subset=320,
                model_kwargs={"width": 8}, lr=0.1, channels_last=False)
    return TrainConfig.from_preset("fast", **{**base, **overrides})


def reposted_script_accuracy(output, target, k=1):
    """What the circulating script computed: the share of *wrong* predictions, printed as "Prec"."""
    pred = output.topk(k, 1).indices.t()
    correct_k = pred.eq(target.view(1, -1).expand_as(pred))[:k].reshape(-1).float().sum()
    return ((len(target) - correct_k) * 100.0 / len(target)).item()


def test_accuracy_is_accuracy_not_error_rate():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 0, 2, 1])  # right, right, right, second best
    top1, top2 = accuracy(logits, target, topk=(1, 2))
    assert top1 == 75.0 and top2 == 100.0
    assert reposted_script_accuracy(logits, target) == 25.0  # the script would have printed "Prec 25%"
    assert accuracy(logits[:1], target[:1]) == [100.0]


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        accuracy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_reference_preset_is_the_reposted_scripts_recipe():
    p = PRESETS["reference"]
    assert (p["epochs"], p["lr"], p["batch_size"], p["momentum"], p["weight_decay"]) == (160, 0.1, 128, 0.9, 5e-4)
    assert tuple(p["milestones"]) == (80, 120) and p["gamma"] == 0.1 and p["warmup_epochs"] == 1
    cfg = TrainConfig.from_preset("reference")
    assert TrainConfig.from_preset("seed") == cfg  # the old name, kept as an alias
    assert "seed" not in PRESETS and PRESETS["seed"] is p  # not listed, still found
    spe = 391  # 50,000 / 128
    # the warm-up really runs (the script built a warm-up scheduler and never stepped it)
    assert lr_factor(0, cfg, spe) == pytest.approx(1 / spe)
    assert lr_factor(spe - 1, cfg, spe) == pytest.approx(1.0)
    assert lr_factor(79 * spe, cfg, spe) == 1.0
    assert lr_factor(80 * spe, cfg, spe) == pytest.approx(0.1)
    assert lr_factor(120 * spe, cfg, spe) == pytest.approx(0.01)


def test_onecycle_rises_to_the_peak_then_falls_to_zero():
    cfg = TrainConfig.from_preset("fast", epochs=10)
    f = [lr_factor(s, cfg, 10) for s in range(100)]
    assert max(f) == 1.0 and f.index(1.0) == 19 and f[-1] == pytest.approx(1 / 80)
    assert all(a <= b for a, b in zip(f[:20], f[1:20])) and all(a >= b for a, b in zip(f[19:], f[20:]))


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="expected one of reference, fast"):
        TrainConfig.from_preset("slow")
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_preset("fast", epochz=3)


def test_loss_falls_and_history_is_complete(tmp_path):
    h = fit(tiny(epochs=4), tmp_path, progress=False, log=lambda s: None)
    losses = [e["train_loss"] for e in h["epochs"]]
    assert losses[-1] < losses[0] * 0.75
    assert h["epochs"][-1]["val_top1"] > 25.0  # chance is 10%
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["config"]["dataset"] == "synthetic" and len(saved["epochs"]) == 4
    for key in ("git_commit", "torch", "device_name", "seed", "command"):
        assert key in saved["meta"]
    for key in ("train_loss", "train_top1", "val_top1", "val_top5", "lr", "seconds"):
        assert key in saved["epochs"][0]
    assert "test_top1" in saved["epochs"][-1] and "test_top1" not in saved["epochs"][0]


def test_checkpoint_loads_with_weights_only(tmp_path):
    fit(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config"}
    assert ckpt["epoch"] == 1


def test_resume_gives_exactly_the_uninterrupted_run(tmp_path):
    cfg = tiny(epochs=2, pipeline="gpu")
    full = fit(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    part = fit(cfg, tmp_path / "part", progress=False, log=lambda s: None, stop_after=1)
    assert len(part["epochs"]) == 1
    resumed = fit(cfg, tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert strip(resumed) == strip(full)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_another_config_is_refused(tmp_path):
    fit(tiny(epochs=2), tmp_path, progress=False, log=lambda s: None, stop_after=1)
    with pytest.raises(ValueError, match=r"config differs in \['lr'\]"):
        fit(tiny(epochs=2, lr=0.05), tmp_path, resume=True, progress=False, log=lambda s: None)


def test_dataloader_pipeline_trains_too(tmp_path):
    h = fit(tiny(epochs=1, pipeline="dataloader", workers=0), tmp_path, progress=False, log=lambda s: None)
    assert math.isfinite(h["epochs"][0]["train_loss"])


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    real = train_mod.build_model

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        model.fc.bias.data.fill_(float("nan"))
        return model

    monkeypatch.setattr(train_mod, "build_model", poisoned)
    with pytest.raises(TrainingDiverged, match="training loss became nan at step 1 at epoch 1"):
        fit(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_auxiliary_loss_is_added_when_the_model_has_one(tmp_path, monkeypatch):
    calls = []
    real = train_mod.build_model

    def with_aux(*args, **kwargs):
        model = real(*args, **kwargs)
        model.auxiliary_loss_weight = 0.5
        plain = model.forward

        def forward(x, return_aux=False):
            out = plain(x)
            calls.append(return_aux)
            return (out, out * 2) if return_aux else out
        model.forward = forward
        return model

    monkeypatch.setattr(train_mod, "build_model", with_aux)
    fit(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)
    assert True in calls


def test_devices():
    assert train_mod.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="expected device cpu, cuda, mps or auto"):
        train_mod.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            train_mod.resolve_device("cuda")


def test_the_previous_checkpoint_is_kept_and_a_truncated_latest_resumes_exactly(tmp_path):
    cfg = tiny(epochs=3, train_subset=192, val_size=64)
    full = fit(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    part = tmp_path / "part"
    fit(cfg, part, progress=False, log=lambda s: None, stop_after=2)
    assert load_checkpoint(part / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint(part / "checkpoint-prev.pt")["epoch"] == 1
    latest = part / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a write cut off half-way
    with pytest.raises(CheckpointError, match="checkpoint.pt: cannot be read as a checkpoint"):
        load_checkpoint(latest)
    damaged_bytes = latest.read_bytes()
    lines = []
    with pytest.warns(RuntimeWarning) as caught:
        resumed = fit(cfg, part, resume=True, progress=False, log=lines.append)
    (warning,) = [str(w.message) for w in caught if "cannot be read" in str(w.message)]
    assert f"{latest} cannot be read: its zip archive is damaged or truncated" in warning
    assert "moved aside to checkpoint.pt.damaged" in warning
    assert f"resumes from {part / 'checkpoint-prev.pt'}" in warning
    assert "resuming" in lines[0] and "after epoch 1" in lines[0]
    assert strip(resumed) == strip(full)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(latest)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "history.json").read_text())["epochs"] == resumed["epochs"]
    # the damaged file was set aside, never rotated into the previous checkpoint: that one is epoch 2
    # of the resumed run, loadable, and resuming from it alone still gives the uninterrupted run
    assert (part / "checkpoint.pt.damaged").read_bytes() == damaged_bytes
    previous = load_checkpoint(part / "checkpoint-prev.pt")
    assert previous["epoch"] == 2 and load_checkpoint(latest)["epoch"] == 3
    latest.unlink()
    again = fit(cfg, part, resume=True, progress=False, log=lambda s: None)
    assert strip(again) == strip(full)
    b = load_checkpoint(latest)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_diverges_after_a_fallback_names_the_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(epochs=3, train_subset=192, val_size=64)  # 2 steps of 64 per epoch
    fit(cfg, tmp_path, progress=False, log=lambda s: None, stop_after=2)
    latest, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint-prev.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    _poison_in_epoch(monkeypatch, "train", 1, 2)  # the first epoch this call trains: epoch 2
    with pytest.warns(RuntimeWarning, match="moved aside"), pytest.raises(TrainingDiverged) as err:
        fit(cfg, tmp_path, resume=True, progress=False, log=lambda s: None)
    assert "at epoch 2" in str(err.value)
    assert f"the last good checkpoint, after epoch 1, is kept in {previous}" in str(err.value)
    assert not latest.exists() and load_checkpoint(previous)["epoch"] == 1


def test_a_refused_resume_moves_nothing(tmp_path):
    cfg = tiny(epochs=3, train_subset=192, val_size=64)
    fit(cfg, tmp_path, progress=False, log=lambda s: None, stop_after=2)
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=r"checkpoint-prev.pt: config differs in \['lr'\]"):
        fit(tiny(epochs=3, train_subset=192, val_size=64, lr=0.05), tmp_path, resume=True, progress=False,
            log=lambda s: None)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _not_a_zip(path):
    path.write_bytes(bytes(range(256)) * 4)


def _empty(path):
    path.write_bytes(b"")


def _arbitrary_objects(path):
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a whole module: pickled classes, not tensors


def _plain_dict(path):
    torch.save({"weights": torch.zeros(2)}, path)


UNREADABLE = {
    "not a zip archive": (_not_a_zip, "not a checkpoint file"),
    "empty": (_empty, "the file is empty"),
    "pickled objects": (_arbitrary_objects, "objects other than tensors"),
    "another dict": (_plain_dict, "not a training checkpoint of attn_lib"),
}


@pytest.mark.parametrize("write, reason", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path, write, reason):
    path = tmp_path / "checkpoint.pt"
    write(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and reason in message and "delete it" in message
    assert "weights_only" not in message and "\n" not in message
    assert err.value.path == path and reason in err.value.reason


def test_a_history_from_another_run_is_refused(tmp_path):
    cfg = tiny(epochs=2, train_subset=128, val_size=0)
    fit(cfg, tmp_path, progress=False, log=lambda s: None, stop_after=1)
    history = json.loads((tmp_path / "history.json").read_text())
    history["epochs"][0]["train_loss"] += 1.0  # e.g. copied from a run with other data
    (tmp_path / "history.json").write_text(json.dumps(history))
    with pytest.raises(CheckpointError, match="come from different runs"):
        fit(cfg, tmp_path, resume=True, progress=False, log=lambda s: None)


def _poison_in_epoch(monkeypatch, what: str, epoch: int, steps_per_epoch: int):
    """Make the model's numbers go wrong during ``epoch`` (1-based): its training loss, its weights
    (a BatchNorm running mean, which the training loss does not see) or its validation loss."""
    real = train_mod.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        calls = {"train": 0}
        plain = model.forward

        def forward(x, **kw):
            out = plain(x, **kw)
            if model.training:
                calls["train"] += 1
                step_epoch = (calls["train"] - 1) // steps_per_epoch + 1
                if step_epoch == epoch:
                    if what == "train":
                        return out * float("nan")
                    if what == "weights":
                        model.layer1[0].bn1.running_mean.data.fill_(float("inf"))  # .data: not seen by autograd
            elif what == "val" and calls["train"] > (epoch - 1) * steps_per_epoch:
                return out * float("nan")
            return out
        model.forward = forward
        return model

    monkeypatch.setattr(train_mod, "build_model", build)


@pytest.mark.parametrize("what, message", [("train", "the training loss became nan at step 1 at epoch 2"),
                                           ("weights", "a weight became NaN or infinite at epoch 2"),
                                           ("val", "the validation loss became nan at epoch 2")])
def test_numbers_going_wrong_mid_training_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, what,
                                                                                 message):
    cfg = tiny(epochs=3, train_subset=192, val_size=64)  # 2 steps of 64 per epoch
    _poison_in_epoch(monkeypatch, what, 2, 2)
    with pytest.raises(TrainingDiverged, match=message) as err:
        fit(cfg, tmp_path, progress=False, log=lambda s: None)
    assert "lower --lr (e.g. 0.05)" in str(err.value)
    assert "last good checkpoint, after epoch 1, is kept" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len(json.loads((tmp_path / "history.json").read_text())["epochs"]) == 1


def test_out_of_memory_names_the_batch_size(tmp_path, monkeypatch):
    real = train_mod.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)

        def forward(x, **kw):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        model.forward = forward
        return model

    monkeypatch.setattr(train_mod, "build_model", build)
    with pytest.raises(TrainingOutOfMemory, match=r"out of memory training at batch size 64 \(epoch 1\): try a "
                                                  r"smaller one, e.g. --batch-size 32"):
        fit(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)


def test_out_of_memory_in_evaluation_is_not_blamed_on_the_batch_size(tmp_path, monkeypatch):
    real = train_mod.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        plain = model.forward

        def forward(x, **kw):
            if not model.training:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return plain(x, **kw)
        model.forward = forward
        return model

    monkeypatch.setattr(train_mod, "build_model", build)
    with pytest.raises(TrainingOutOfMemory) as err:
        fit(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)
    message = str(err.value)
    assert "evaluating the validation set at epoch 1, in batches of 1024 images" in message
    assert "--batch-size sets the training batch only" in message and "try a smaller one" not in message


def test_out_of_memory_before_training_writes_nothing(tmp_path, monkeypatch):
    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_mod, "GPULoader", no_room)
    with pytest.raises(TrainingOutOfMemory, match="before training began .*nothing was written"):
        fit(tiny(epochs=1, pipeline="gpu"), tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_fits_the_per_epoch_generator():
    assert train_mod.SEED_MAX * train_mod.EPOCH_SEED_STRIDE + 10**9 < 2**64
    torch.Generator().manual_seed(train_mod.SEED_MAX * train_mod.EPOCH_SEED_STRIDE + 10**6)
    assert tiny(seed=train_mod.SEED_MAX).problems() == []
    assert tiny(seed=train_mod.SEED_MAX + 1).problems() == [
        f"seed {train_mod.SEED_MAX + 1}: expected an integer from 0 to 4294967295 (2**32 - 1)"]


def test_a_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    cfg = tiny(epochs=1, train_subset=128, val_size=64)
    eager = fit(cfg, tmp_path / "eager", progress=False, log=lambda s: None)
    calls = []

    def broken_compile(model, *args, **kwargs):
        def run(*a, **kw):
            calls.append(1)
            raise RuntimeError("inductor: no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning) as caught:
        compiled = fit(dataclasses_replace(cfg, compile=True), tmp_path / "compiled", progress=False,
                       log=lambda s: None)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 1 and "RuntimeError: inductor: no C++ compiler found" in messages[0]
    assert "continues without compiling" in messages[0] and calls == [1]
    assert strip(compiled) == strip(eager)
    assert compiled["meta"]["compiled"] is False and "no C++ compiler" in compiled["meta"]["compile_failure"]


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_fast_preset_compiles_on_cuda_only_by_default():
    assert PRESETS["fast"]["compile"] == "auto" and PRESETS["reference"]["compile"] is False
    assert TrainConfig.from_preset("fast", compile=False).compile is False


@pytest.mark.parametrize("native_bf16, expected", [(True, (torch.bfloat16, False)), (False, (torch.float16, True))])
def test_mixed_precision_picks_float16_with_a_scaler_where_bf16_is_only_emulated(monkeypatch, native_bf16,
                                                                                expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native_bf16 or including_emulation  # a T4: bf16 "supported" only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_choice(torch.device("cuda"), True) == expected
    assert asked == {"including_emulation": False}
    assert amp_choice(torch.device("cuda"), False) == (None, False)
    assert amp_choice(torch.device("cpu"), True) == (None, False)


def test_checkpoint_writes_are_measured(tmp_path):
    h = fit(tiny(epochs=2, train_subset=128, val_size=0), tmp_path, progress=False, log=lambda s: None)
    info = h["meta"]["checkpoint"]
    assert info["writes"] == 2 and info["blocking_seconds"] >= 0 and info["background_write_seconds"] > 0
