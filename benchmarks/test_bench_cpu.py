"""CPU benchmarks of the I-LoRA layer (pytest-benchmark) and checks of the benchmark harness itself.

Smoke test (one call per benchmark):  .venv/bin/python -m pytest benchmarks/ -q --benchmark-disable
Real numbers:                          .venv/bin/python -m pytest benchmarks/ -q --benchmark-only
The benchmarks run at the SPEC acceptance shape: T = 1024 tokens, 1024 -> 2816, r = 16, K = 3, fp32.
"""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from benchmarks import competitors as C
from benchmarks import run as R
from benchmarks import runner, timers, train_step
from benchmarks import suites as S

ACCEPT = C.Case("accept", 1024, 2816, 1024, 16, 3)
BENCH_COMPETITORS = ("base", "crab-loop", "peft", "reference", "cpu")


@pytest.fixture(scope="module")
def accept_inputs():
    return C.make_inputs(ACCEPT, "cpu", torch.float32, seed=0)


def _build_or_skip(name, inp, case):
    try:
        return C.build(name, inp, case)
    except C.Unavailable as exc:
        pytest.skip(f"{name} unavailable: {exc}")


@pytest.mark.parametrize("measure", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", BENCH_COMPETITORS)
def test_bench_accept_shape(benchmark, accept_inputs, name, measure):
    runner = _build_or_skip(name, accept_inputs, ACCEPT)
    benchmark.group = f"accept 1024->2816 N=1024 r=16 K=3 fp32 {measure}"
    benchmark.extra_info.update(floor=C.floor_ratios(ACCEPT)["fwdbwd" if measure == "fwdbwd" else "fwd"],
                                threads=torch.get_num_threads())
    fn = runner.fwd if measure == "fwd" else runner.fwdbwd
    out = benchmark(fn)
    if measure == "fwd":
        assert out.shape == (ACCEPT.n, ACCEPT.d_out)
    else:
        assert out[0].shape == accept_inputs.x.shape


# float16 CPU GEMMs have no fast ATen kernel on most CPUs: the base layer and the reference backend pay for it, the
# cpu backend runs its float16 GEMMs in float32 (about 140x faster at this shape's full N = 1024, 2-core AMD EPYC)
LOW_PRECISION = C.Case("accept/4", 1024, 2816, 256, 16, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["base", "reference", "cpu"])
def test_bench_low_precision(benchmark, name, dtype):
    inputs = C.make_inputs(LOW_PRECISION, "cpu", dtype, seed=0)
    runner = _build_or_skip(name, inputs, LOW_PRECISION)
    benchmark.group = f"1024->2816 N=256 r=16 K=3 {str(dtype).split('.')[1]} fwdbwd"
    out = benchmark.pedantic(runner.fwdbwd, rounds=3, warmup_rounds=1)
    assert out[0].shape == inputs.x.shape and out[0].dtype == dtype


# ---------------------------------------------------------------------------------------------------------------
# the harness: FLOP accounting, competitors computing the same thing, saved-bytes counting, the suite runner


def test_floor_matches_the_cost_model():
    # KERNELS.md: gate_proj 3584 -> 18944, N = 4096, r = 128, K = 3: fwd+bwd floor (2 x 556 + 63 + 127) / (2 x 556)
    gate = C.Case("qwen.gate_proj", 3584, 18944, 4096, 128, 3)
    f, b = C.adapter_flops(gate.n, gate.d_in, gate.d_out, gate.r, gate.k)
    assert f == pytest.approx(63.4e9, rel=1e-2) and b == pytest.approx(126.9e9, rel=1e-2)
    assert C.base_flops(gate.n, gate.d_in, gate.d_out)[0] == pytest.approx(556.3e9, rel=1e-3)
    assert C.floor_ratios(gate)["fwdbwd"] == pytest.approx(1.17, abs=0.005)


def test_competitors_compute_the_same_layer():
    case = C.Case("t", 40, 56, 13, 8, 3)
    inp = C.make_inputs(case, "cpu", torch.float64, seed=3)
    ref = C.build("reference", inp, case)
    y_ref = ref.fwd()
    g_ref = ref.bwd(y_ref)
    crab = C.build("crab-loop", inp, case)
    y_crab = crab.fwd()
    g_crab = crab.bwd(y_crab)
    # the Crab loop's softmax runs in float32 even for float64 inputs (Crab+ semantics): float32-level agreement
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_crab, y_ref, **tol)
    torch.testing.assert_close(g_crab[0], g_ref[0], **tol)  # dx
    torch.testing.assert_close(g_crab[1], g_ref[1], **tol)  # d router
    torch.testing.assert_close(g_crab[2], g_ref[2], **tol)  # dA
    torch.testing.assert_close(torch.stack(g_crab[3:]), g_ref[3], **tol)  # dB_k
    base = C.build("base", inp, case)
    assert (y_ref - base.fwd()).abs().max() > 1e-3  # the adapter is not a zero shortcut

    one = C.Case("t1", 40, 56, 13, 8, 1)  # K = 1: I-LoRA is plain LoRA (g = 1), so PEFT must agree exactly
    inp1 = C.make_inputs(one, "cpu", torch.float64, seed=4)
    try:
        peft_runner = C.build("peft", inp1, one)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    ref1 = C.build("reference", inp1, one)
    y_p, y_r = peft_runner.fwd(), ref1.fwd()
    torch.testing.assert_close(y_p, y_r)
    gp, gr = peft_runner.bwd(y_p), ref1.bwd(y_r)
    torch.testing.assert_close(gp[0], gr[0])  # dx
    names = [n for n, p in peft_runner.keep[0].named_parameters() if p.requires_grad]
    by_name = dict(zip(names, gp[1:]))
    d_a = next(v for n, v in by_name.items() if "lora_A" in n)
    d_b = next(v for n, v in by_name.items() if "lora_B" in n)
    torch.testing.assert_close(d_a, gr[2])
    torch.testing.assert_close(d_b, gr[3][0])


def test_saved_bytes_counting():
    case = C.Case("t", 64, 512, 32, 8, 3)
    inp = C.make_inputs(case, "cpu", torch.float32)
    budget = C.saved_budget_bytes(case, torch.float32)
    saved = {}
    for name in ("base", "crab-loop", "reference"):
        runner = C.build(name, inp, case)
        with C.count_saved_bytes(runner.params) as total:
            runner.fwd()
        saved[name] = total[0]
    assert saved["base"] == 0  # F.linear with a frozen weight keeps only the weight, which is excluded
    assert saved["reference"] <= budget  # SPEC memory target: x + h + g
    assert saved["crab-loop"] >= case.k * case.n * case.d_out * 4  # K full-size temporaries


def test_gpu_suite_case_list_and_budget():
    cases = S.gpu_cases()
    assert len(cases) == len(set(cases))
    labels = [c.label for c in cases]
    for shape in ("qwen.q_proj", "qwen.k_proj", "qwen.gate_proj", "qwen.down_proj"):
        assert any(label.startswith(shape) and "N=4096 r=128 K=3" in label for label in labels)
    est, lines = S.estimate_gpu_seconds(cases, C.GPU_COMPETITORS, 10, 50)
    assert len(lines) == len(cases) and est < 150  # ~4 minutes minus compilation, build and training step
    accept = [c for c in S.cpu_cases() if (c.d_in, c.d_out, c.n, c.r, c.k) == (1024, 2816, 1024, 16, 3)]
    assert accept, "the CPU suite must contain the acceptance shape"


def test_gpu_dry_run_writes_every_output(tmp_path, capsys):
    rc = R.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path), "--no-train",
                 "--only", r"qwen\.(q|gate)_proj .*N=(16|4096) r=128"])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    stem = [f for f in files if f.endswith(".csv")][0][:-4]
    assert stem.startswith("dryrun-gpu-")
    for suffix in (".md", "-time.png", "-ratio.png", "-memory.png"):
        assert stem + suffix in files
    rows = list(csv.DictReader(open(tmp_path / (stem + ".csv"))))
    assert len(rows) == 4 * len(C.GPU_COMPETITORS)
    for r in rows:
        if r["competitor"] in ("base", "crab-loop", "reference"):
            assert r["error"] == "" and float(r["fwdbwd_ms"]) > 0 and r["saved_bytes"] != ""
        if r["competitor"] in ("triton-fused", "triton-cublas", "cuda"):
            assert r["error"].startswith("unavailable") or r["fwdbwd_ms"]
    assert any(float(r["speedup_vs_crab"] or 0) > 0 for r in rows)
    assert "estimated GPU suite time" in capsys.readouterr().out


def test_without_matplotlib_the_run_says_it_skipped_the_plots(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rc = R.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path), "--no-train", "--competitors", "base",
                 "--only", r"qwen\.q_proj .*N=16 r=128"])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    assert not [f for f in files if f.endswith(".png")]
    out = capsys.readouterr().out
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")][0]
    assert ".png" not in wrote and ".csv" in wrote                # it does not claim plots it did not write
    assert "plots skipped: matplotlib is not installed" in out and "pip install 'ilora-kernels[bench]'" in out
    md = [f for f in files if f.endswith(".md")][0]
    assert "plots skipped: matplotlib is not installed" in (tmp_path / md).read_text()


def test_error_rows_do_not_stop_the_suite(tmp_path, monkeypatch):
    def broken(inp, case):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(C.BUILDERS, "broken", broken)
    rows = runner.run_cases([C.Case("t", 32, 48, 8, 4, 3), C.Case("t", 32, 48, 16, 4, 3)],
                            ["base", "broken", "reference"], torch.device("cpu"), torch.float32,
                            timers.CpuTimer(0.001, 1, 2), {"suite": "test"}, runner.Budget(None), lambda rows: None)
    assert len(rows) == 6
    assert all("OutOfMemoryError" in r["error"] for r in rows if r["competitor"] == "broken")
    assert all(r.get("fwdbwd_ms") for r in rows if r["competitor"] != "broken")
    over = runner.run_cases([C.Case("t", 32, 48, 8, 4, 3)], ["base"], torch.device("cpu"), torch.float32,
                            timers.CpuTimer(0.001, 1, 2), {}, runner.Budget(0.0), lambda rows: None)
    assert over[0]["error"].startswith("skipped: time budget")


def test_training_step_tiny():
    pytest.importorskip("transformers")
    rows = train_step.train_step_rows(torch.device("cpu"), torch.float32, {}, runner.Budget(None), tiny=True)
    assert len(rows) == 4
    for r in rows:
        assert not r.get("error"), r.get("error")
        assert r["tokens_per_s"] > 0 and math.isfinite(r["fwdbwd_ms"])
