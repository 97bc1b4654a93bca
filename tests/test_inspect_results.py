import pytest
import torch

import attn_lib
from attn_lib import results
from attn_lib.inspect import attention_modules, collect_attention, grad_cam


def test_collect_attention_records_every_gate_and_restores_the_model():
    model = attn_lib.models.resnet18(10, attention="se", width=8, reduction=4).train()
    x = torch.randn(2, 3, 32, 32)
    maps = collect_attention(model, x)
    assert list(maps) == [f"layer{s}.{b}.gate" for s in range(1, 5) for b in range(2)]
    assert maps["layer4.1.gate"].shape == (2, 64, 1, 1)
    assert model.training  # mode restored
    assert all("forward" not in vars(m) for m in attention_modules(model).values())  # no wrapper left
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_collect_attention_on_stage_modules():
    model = attn_lib.models.resnet18(10, attention="nonlocal", width=8)
    maps = collect_attention(model, torch.randn(1, 3, 32, 32))
    assert list(maps) == ["layer3.1"] and maps["layer3.1"].shape == (1, 64, 16)


def test_grad_cam_is_a_normalised_map_of_the_input_size():
    model = attn_lib.models.resnet18(10, width=8)
    cam = grad_cam(model, torch.randn(3, 3, 32, 32), model.layer4, target=torch.tensor([0, 1, 2]))
    assert cam.shape == (3, 32, 32) and cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_recorded_runs_carry_their_provenance_and_load():
    histories = results.load_histories("cifar10-cpu-w16")
    assert {"none", "se", "sk", "cbam"} <= set(histories)
    weights = {p.stem.split("--")[1] for p in (results.HERE / "weights").glob("cifar10-cpu-w16--*.pt")}
    assert weights == set(histories), "every recorded narrow run ships its weights, and only those"
    for name, h in histories.items():
        meta = h["meta"]
        assert meta["command"].startswith("python -m attn_lib train") and meta["git_commit"]
        assert meta["train_images"] == 45000 and meta["val_images"] == 5000 and meta["test_images"] == 1000
        assert "test_top1" in h["epochs"][-1]
        model = results.load_trained("cifar10-cpu-w16", name)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(FileNotFoundError, match="available"):
        results.load("no-such-run")


def test_recorded_gpu_runs_are_the_unchanged_histories_of_one_commit():
    runs = results.load_runs("cifar10-h200-r18")
    assert {name: sorted(seeds) for name, seeds in runs.items() if len(seeds) == 3} == \
        {"none": [0, 1, 2], "se": [0, 1, 2], "sk": [0, 1, 2], "cbam": [0, 1, 2]}
    for name, seeds in runs.items():
        for seed, h in seeds.items():
            assert h["meta"]["git_commit"] == "a4d04bebb26c8f74a405313e4af30b1dfda9648c"
            assert h["meta"]["seed"] == seed == h["config"]["seed"] and h["meta"]["device_name"] == "NVIDIA H200"
            assert h["config"]["attention"] == (None if name == "none" else name)
            assert len(h["epochs"]) == h["config"]["epochs"] == 20
    with pytest.raises(ValueError, match="several seeds"):
        results.load_histories("cifar10-h200-r18")
    assert results.commit_label({"git_commit": "0123456789abcdef-dirty"}) == "0123456789-dirty"
