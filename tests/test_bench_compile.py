"""The eager-vs-compiled benchmark and the operation count (tiny settings; not timed tests)."""

import pytest
import torch

from attn_lib.bench_compile import bench_compile, dispatched_ops
from attn_lib.models import resnet18


def test_dispatched_ops_counts_dia_vector_work():
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    plain = dispatched_ops(resnet18(10, width=8), x, y)
    dia = dispatched_ops(resnet18(10, attention="dia", width=8), x, y)
    assert plain["total"] == sum(plain[k] for k in ("feature_map", "vector", "other"))
    # 8 cell steps, each a dozen or more vector operations forward and more backward
    assert dia["vector"] - plain["vector"] > 8 * 20
    assert dia["feature_map"] > plain["feature_map"]  # pooling and gating the branches


def test_dispatched_ops_leaves_no_gradients_and_checks_input():
    model = resnet18(10, width=8)
    dispatched_ops(model, torch.randn(2, 3, 16, 16), torch.tensor([3, 1]))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"expected images \[B, C, H, W\], got \[3, 8, 8\]"):
        dispatched_ops(model, torch.randn(3, 8, 8), torch.tensor([3]))


def test_bench_compile_rows(tmp_path):
    result = bench_compile("cpu", batch=2, width=8, rounds=2, steps=1, warmup=0, backend="eager")
    rows = {(r["attention"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(a, m) for a in ("none", "dia") for m in ("eager", "compiled")}
    assert rows["none", "eager"]["ratio_to_plain_same_mode"] == 1.0
    assert rows["dia", "eager"]["ratio_to_eager_same_model"] == 1.0
    assert all(r["step_seconds"] > 0 and r["first_step_seconds"] > 0 for r in rows.values())
    assert rows["dia", "eager"]["params"] > rows["none", "eager"]["params"]
    with pytest.raises(ValueError, match="start with the baseline 'none'"):
        bench_compile("cpu", mechanisms=("dia",))
