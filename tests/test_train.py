import json
import math

import pytest
import torch

import attn_lib.train as train_mod
from attn_lib.train import PRESETS, TrainConfig, TrainingDiverged, accuracy, fit, load_checkpoint, lr_factor


def tiny(**overrides) -> TrainConfig:
    """ResNet-18 at width 8 on the synthetic set: seconds on a CPU."""
    base = dict(dataset="synthetic", device="cpu", epochs=2, batch_size=64, val_size=64, train_subset=320,
                model_kwargs={"width": 8}, lr=0.1, channels_last=False)
    return TrainConfig.from_preset("fast", **{**base, **overrides})


def seed_style_accuracy(output, target, k=1):
    """What the circulating script computed: the share of *wrong* predictions, printed as "Prec"."""
    pred = output.topk(k, 1).indices.t()
    correct_k = pred.eq(target.view(1, -1).expand_as(pred))[:k].reshape(-1).float().sum()
    return ((len(target) - correct_k) * 100.0 / len(target)).item()


def test_accuracy_is_accuracy_not_error_rate():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 0, 2, 1])  # right, right, right, second best
    top1, top2 = accuracy(logits, target, topk=(1, 2))
    assert top1 == 75.0 and top2 == 100.0
    assert seed_style_accuracy(logits, target) == 25.0  # the seed would have printed "Prec 25%"
    assert accuracy(logits[:1], target[:1]) == [100.0]


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        accuracy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_seed_preset_is_the_seed_recipe():
    p = PRESETS["seed"]
    assert (p["epochs"], p["lr"], p["batch_size"], p["momentum"], p["weight_decay"]) == (160, 0.1, 128, 0.9, 5e-4)
    assert tuple(p["milestones"]) == (80, 120) and p["gamma"] == 0.1 and p["warmup_epochs"] == 1
    cfg = TrainConfig.from_preset("seed")
    spe = 391  # 50,000 / 128
    # the warm-up really runs (the seed built a warm-up scheduler and never stepped it)
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
    with pytest.raises(ValueError, match="expected one of seed, fast"):
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
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h["epochs"]]  # noqa: E731
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
    with pytest.raises(TrainingDiverged, match="training loss became nan at epoch 1, step 1"):
        fit(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)


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
