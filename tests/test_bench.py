"""Smoke tests of the module benchmark: its code paths on tiny settings, and the shape of its results.

No timing is asserted (timings depend on the machine); what is checked is the structure, that
every ratio is taken against a baseline timed in the same round, and the FLOP and parameter counts
that follow from the formulas.
"""
import functools
import json
import statistics
import sys

import pytest
import torch

import attn_lib.bench as bench
import attn_lib.bench_modules as bm
from attn_lib.models import resnet18

CPU = torch.device("cpu")
WIDTH = 16  # stages of 16, 32, 64, 128 channels: the smallest width at which every reduction works
STAGES = [WIDTH * 2**i for i in range(4)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny steps on a shared machine are dominated by threads waiting for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mechanism_rows():
    return bm.mechanism_rows(CPU, bm.MECHANISMS, batch=2, steps=1, warmup=0, rounds=2, width=WIDTH)


@pytest.fixture(scope="module")
def attention_rows():
    return bm.explicit_vs_fused_rows(CPU, (4, 8), batch=1, channels=16, steps=1, warmup=0, rounds=1)


def test_mechanism_rows_cover_every_mechanism_against_the_plain_network(mechanism_rows):
    assert [r["attention"] for r in mechanism_rows] == list(bm.MECHANISMS)
    assert all(r["kind"] == "mechanism" for r in mechanism_rows)
    base = mechanism_rows[0]
    assert base["attention"] == "none" and base["placement"] is None
    assert base["params"] == sum(p.numel() for p in resnet18(10, width=WIDTH).parameters())
    assert base["params_added"] == 0 and base["flops_added"] == 0 and base["step_time_ratio"] == 1.0
    keys = set(base)
    for r in mechanism_rows:
        assert set(r) == keys
        assert all(not isinstance(v, (dict, list, tuple)) for v in r.values())  # flat
        assert r["params"] > 0 and r["flops_forward"] > 0
        assert r["step_seconds"] > 0 and r["images_per_second"] > 0 and r["step_time_ratio"] > 0
        assert r["params_added"] == r["params"] - base["params"]
        assert r["flops_added"] == r["flops_forward"] - base["flops_forward"]
        assert r["params_added_pct"] == pytest.approx(100 * r["params_added"] / base["params"])
        if sys.platform.startswith("linux"):  # peak RSS of a step; elsewhere not measured on the CPU
            assert r["peak_memory_mib"] >= 0
            assert r["peak_memory_ratio"] is None or r["peak_memory_ratio"] >= 0
        else:
            assert r["peak_memory_mib"] is None and r["peak_memory_ratio"] is None
        assert (r["batch"], r["width"], r["rounds"], r["dtype"]) == (2, WIDTH, 2, "float32")
    by_name = {r["attention"]: r for r in mechanism_rows}
    for name in bm.MECHANISMS[1:]:
        assert by_name[name]["params_added"] > 0 and by_name[name]["flops_added"] > 0, name
    assert [by_name[n]["placement"] for n in ("se", "sk", "nonlocal", "dia")] == ["gate", "conv", "stage", "shared"]


def test_se_adds_the_flops_and_parameters_of_its_formula(mechanism_rows):
    se = next(r for r in mechanism_rows if r["attention"] == "se")
    hidden = [c // 16 for c in STAGES]
    # Two blocks per stage; per block fc1 (C -> C/r) and fc2 (C/r -> C): 2 C h multiply-adds, 2 FLOPs each.
    assert se["flops_added"] == sum(2 * (4 * c * h) for c, h in zip(STAGES, hidden))
    assert se["params_added"] == sum(2 * (2 * c * h + c + h) for c, h in zip(STAGES, hidden))
    # The counter's own figure, independent of the benchmark's bookkeeping.
    assert bm.forward_flops(resnet18(10, "se", width=WIDTH)) - bm.forward_flops(resnet18(10, width=WIDTH)) \
        == se["flops_added"]


def test_ratios_are_taken_within_a_round(monkeypatch):
    """With a clock that drifts 100x between rounds but is equal within one, every ratio is 1."""
    names = ("none", "se", "eca")
    calls = []

    def fake_time_steps(step, batches, warmup, steps, device):
        calls.append(step)
        return 10.0 ** ((len(calls) - 1) // len(names))  # round r: every model takes 10**r s

    monkeypatch.setattr(bm, "_time_steps", fake_time_steps)
    rows = bm.mechanism_rows(CPU, names, batch=2, steps=1, warmup=0, rounds=3, width=WIDTH)
    assert len(calls) == 9
    assert [r["step_time_ratio"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["step_seconds"] for r in rows] == [10.0, 10.0, 10.0]
    # the order rotates from round to round, so no model is always timed first
    firsts = [calls[i] for i in (0, 3, 6)]
    assert len({id(f) for f in firsts}) == 3


def test_mechanism_rows_need_the_baseline_first():
    with pytest.raises(ValueError, match="baseline 'none'"):
        bm.mechanism_rows(CPU, ("se", "none"), batch=2, steps=1, warmup=0, rounds=1, width=WIDTH)


def test_explicit_vs_fused_rows_for_each_module_and_size(attention_rows):
    assert {(r["module"], r["size"]) for r in attention_rows} == {
        (m, s) for m in ("nonlocal", "danet_position") for s in (4, 8)}
    assert len(attention_rows) == 4
    for r in attention_rows:
        assert r["kind"] == "explicit_vs_fused"
        assert all(not isinstance(v, (dict, list, tuple)) for v in r.values())
        assert (r["batch"], r["channels"], r["positions"]) == (1, 16, r["size"] ** 2)
        assert r["explicit_seconds"] > 0 and r["fused_seconds"] > 0
        # one round: the ratio is exactly that round's explicit time over its fused time
        assert r["explicit_over_fused_time"] == pytest.approx(r["explicit_seconds"] / r["fused_seconds"])
        assert r["attention_map_mib"] == pytest.approx(r["positions"] ** 2 * 4 / 2**20)
        assert r["channels_last"] is True and isinstance(r["fused_kernel"], str)
        if sys.platform.startswith("linux"):
            assert r["explicit_peak_mib"] >= 0 and r["fused_peak_mib"] >= 0
        assert "errors" not in r
    nonlocal_row = next(r for r in attention_rows if r["module"] == "nonlocal")
    assert nonlocal_row["options"] == "mode=embedded, sub_sample=False"
    # the benchmark compares something real: the "fused" non-local block runs a fused kernel
    assert nonlocal_row["fused_kernel"] != "math"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak needs Linux's clear_refs")
def test_cpu_peak_memory_sees_a_large_allocation():
    def allocate():
        t = torch.ones(2**24)  # 64 MiB, touched
        del t
    assert bm._peak_mib(allocate, CPU) == pytest.approx(64, abs=8)
    assert bm._peak_mib(lambda: None, CPU) < 8


def test_explicit_and_fused_compute_the_same_function():
    """What the benchmark compares must be one function computed two ways."""
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    for label, (name, options) in bm.ATTENTION_MODULES.items():
        outs = []
        for impl in ("explicit", "fused"):
            torch.manual_seed(0)
            module = bm.create_attention(name, 16, implementation=impl, **options).double()
            for p in module.parameters():  # leave the identity start: make the attention term count
                torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.constant_(p, 0.5)
            outs.append(module(x))
        torch.testing.assert_close(outs[0], outs[1], msg=label)


def test_run_modules_end_to_end_on_tiny_settings(monkeypatch):
    tiny = functools.partial(bm.bench_modules, mechanisms=("none", "se"), batch=2, width=WIDTH, rounds=1,
                             warmup=0, attn_sizes=(4,), attn_batch=1, attn_channels=16, attn_rounds=1,
                             min_seconds=0.0, densenet=False)
    monkeypatch.setattr(bm, "bench_modules", tiny)
    threads = torch.get_num_threads()
    results = bench.run("modules", device="cpu", steps=1, seed=3, command="python -m attn_lib bench modules")
    assert torch.get_num_threads() == threads  # restored after the run
    assert results["benchmark"] == "modules"
    assert results["command"] == "python -m attn_lib bench modules" and results["seed"] == 3
    assert results["device"] == "cpu" and "git_commit" in results and results["cpu_threads"] == 1
    assert [r["kind"] for r in results["rows"]] == ["mechanism"] * 2 + ["explicit_vs_fused"] * 2
    assert results["settings"]["steps"] == 1 and results["seconds_total"] > 0
    json.dumps(results)  # a results file can be written
    text = bench.summary(results)
    assert text.startswith("modules benchmark on") and text.count("\n") == 4


def test_bench_modules_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown settings"):
        bm.bench_modules(CPU, 1, 0, batchsize=2)


def test_median_ratio_pairs_rounds():
    times = {"none": [1.0, 10.0, 100.0], "x": [2.0, 30.0, 100.0]}
    assert bm._median_ratio(times, "x", "none") == statistics.median([2.0, 3.0, 1.0]) == 2.0


def test_every_mechanism_compiles_in_resnet18_with_fullgraph_and_gets_a_compiled_ratio():
    """fullgraph=True: a graph break anywhere (DIA's shared LSTM stage included) is an error."""
    out = bm.compiled_step_ratios(CPU, bm.MECHANISMS, batch=2, steps=1, warmup=0, rounds=1, width=WIDTH,
                                  backend="eager")
    assert list(out) == list(bm.MECHANISMS)
    assert {n: r["compile_error"] for n, r in out.items()} == {n: None for n in bm.MECHANISMS}
    assert out["none"]["compiled_step_time_ratio"] == 1.0
    assert all(r["compiled_step_seconds"] > 0 and r["compiled_step_time_ratio"] > 0 for r in out.values())


def test_a_graph_break_is_recorded_not_timed(monkeypatch):
    real = bm._build

    def with_break(name, width, seed):
        model = real(name, width, seed)
        if name == "se":
            plain = model.forward

            def forward(x):
                torch._dynamo.graph_break()
                return plain(x)
            model.forward = forward
        return model

    monkeypatch.setattr(bm, "_build", with_break)
    out = bm.compiled_step_ratios(CPU, ("none", "se"), batch=2, steps=1, warmup=0, rounds=1, width=WIDTH,
                                  backend="eager")
    assert out["se"]["compiled_step_time_ratio"] is None and "se" in out and out["se"]["compile_error"]
    assert out["none"]["compile_error"] is None


@pytest.mark.parametrize("label", list(bm.ATTENTION_MODULES))
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_explicit_and_fused_attention_compile_without_graph_breaks(label, impl):
    torch._dynamo.reset()
    name, options = bm.ATTENTION_MODULES[label]
    module = bm.create_attention(name, 16, implementation=impl, **options)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))


def test_densenet_rows_compare_triple_attention_with_the_plain_densenet():
    rows = bm.densenet_rows(CPU, batch=2, steps=1, warmup=0, rounds=1, growth_rate=4, compile=True,
                            backend="eager")
    assert [r["attention"] for r in rows] == ["none", "triple"] and all(r["kind"] == "densenet" for r in rows)
    assert rows[0]["step_time_ratio"] == 1.0 and rows[0]["params_added_pct"] == 0
    assert rows[1]["params"] > rows[0]["params"] and rows[1]["flops_forward"] > rows[0]["flops_forward"]
    assert rows[1]["step_time_ratio"] > 0 and rows[1]["compile_error"] is None
    assert rows[1]["compiled_step_time_ratio"] > 0
    assert all(not isinstance(v, (dict, list, tuple)) for r in rows for v in r.values())


def test_bench_train_measures_the_reference_pipeline_with_2_workers():
    names = lambda rows: [r["name"] for r in rows]  # noqa: E731
    rows = bench.train_configs(CPU, None, cpus=16)
    assert names(rows) == ["reference", "reference-2-workers", "fast"]
    assert [r["workers"] for r in rows] == [5, 2, 0] and not any(r["fused"] for r in rows)
    cuda = bench.train_configs(torch.device("cuda"), None, cpus=2)
    assert names(cuda) == ["reference", "fast", "fast+compile"] and cuda[0]["workers"] == 2
    assert cuda[1]["fused"] and cuda[2]["compile"]
    assert names(bench.train_configs(CPU, True, cpus=16))[-1] == "fast+compile"
    assert "fast+compile" not in names(bench.train_configs(torch.device("cuda"), False, cpus=16))
