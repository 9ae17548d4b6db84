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

import ilora_kernels as ik
from benchmarks import competitors as C
from benchmarks import readme_section, runner, timers, train_step, writers
from benchmarks import run as R
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
    assert len(cases) == len(set(cases)) == len({c.label for c in cases})
    first = cases[:16]  # the priority cases: Crab+ training shapes at p = 0 and 0.1, then decode
    for shape in ("qwen.q_proj", "qwen.k_proj", "qwen.gate_proj", "qwen.down_proj"):
        for p in (0.0, 0.1):
            assert any(c.shape == shape and (c.n, c.r, c.k, c.dropout, c.decode) == (4096, 128, 3, p, False)
                       for c in first)
        assert {c.n for c in cases if c.shape == shape and c.decode} == {1, 2, 4, 8, 16}
    assert all(not c.decode for c in cases[:8]) and all(c.decode for c in cases[8:28])
    est, lines = S.estimate_gpu_seconds(cases, C.GPU_COMPETITORS, rounds=5, target_ms=20)
    assert len(lines) == len(cases) and est < 150  # the suite's stage in scripts/gpu_check.sh has about 170 s
    accept = [c for c in S.cpu_cases() if (c.d_in, c.d_out, c.n, c.r, c.k) == (1024, 2816, 1024, 16, 3)]
    assert accept, "the CPU suite must contain the acceptance shape"


DRY_ONLY = r"^qwen\.(q|gate)_proj .*(N=4096 r=128 K=3( p=0\.1)?|N=(1|16) r=128 K=3 decode)$"


def test_gpu_dry_run_writes_every_output(tmp_path, capsys):
    rc = R.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path), "--no-train", "--only", DRY_ONLY])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    stem = [f for f in files if f.endswith(".csv")][0][:-4]
    assert stem.startswith("dryrun-gpu-")
    for suffix in (".md", "-time.png", "-ratio.png", "-memory.png"):
        assert stem + suffix in files
    rows = list(csv.DictReader(open(tmp_path / (stem + ".csv"))))
    competitors = [("cpu" if c == "cuda" else c) for c in C.GPU_COMPETITORS]   # the dry run's stand-in for cuda
    assert len(rows) == 8 * len(competitors) and {r["competitor"] for r in rows} == set(competitors)
    assert {r["mode"] for r in rows} == {"train", "decode"} and {r["dropout"] for r in rows} == {"0.0", "0.1"}
    for r in rows:
        assert r["timing"] == "interleaved" and r["graph_ms"] == ""            # no CUDA graphs on CPU
        if r["competitor"] in ("base", "crab-loop", "reference", "peft", "cpu"):
            assert r["error"] == "", r["error"]
            assert float(r["wall_ms"]) > 0 and r["graph_note"].startswith("graph capture skipped")
            assert float(r["ratio_wall"]) > 0
            assert (r["saved_bytes"] != "") == (r["mode"] == "train")
        if r["competitor"] == "triton":  # TRITON_INTERPRET is not set in this process
            assert r["error"].startswith("unavailable") or r["wall_ms"]
    assert any(float(r["vs_crab_wall"] or 0) > 0 for r in rows)
    assert all(float(r["floor_ratio"]) > 1 for r in rows)
    out = capsys.readouterr().out
    assert "estimated GPU suite time" in out and "decode" in out
    md = (tmp_path / (stem + ".md")).read_text()
    assert "(forward, no grad)" in md and "(fwd+bwd)" in md and "every competitor is timed the same way" in md
    section = "\n".join(readme_section.section_for(str(tmp_path / (stem + ".csv"))))
    assert "ms as CUDA graph / eager wall" in section and "decode (forward, no grad)" in section


def test_skipped_competitor_keeps_its_rows(tmp_path):
    rc = R.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path), "--no-train", "--competitors", "base,cuda",
                 "--skip", "cuda=broke the context earlier", "--only", r"^qwen\.k_proj .*N=1 r=128 K=3 decode$"])
    assert rc == 0
    rows = list(csv.DictReader(open(next(tmp_path.glob("*.csv")))))
    by = {r["competitor"]: r for r in rows}
    assert by["cpu"]["error"] == "skipped: broke the context earlier" and float(by["base"]["wall_ms"]) > 0


def test_interleaved_rows_and_ratios():
    """run_cases_interleaved on CPU: every competitor timed in every round, ratios against base, PEFT and Crab."""
    cases = [C.Case("t", 32, 48, 8, 4, 3, dropout=0.1), C.Case("t", 32, 48, 2, 4, 3, decode=True)]
    timing = runner.Interleaved(rounds=3, target_ms=0.5, graphs=False, no_graph_note="cpu")
    rows = runner.run_cases_interleaved(cases, ["base", "peft", "crab-loop", "reference"], torch.device("cpu"),
                                        torch.float32, timing, {"suite": "t"}, runner.Budget(None), lambda rows: None)
    assert len(rows) == 8
    for r in rows:
        assert not r.get("error"), r.get("error")
        assert r["rounds"] == 3 and r["wall_ms"] > 0 and r["wall_p80_ms"] >= r["wall_ms"]
        assert r["graph_note"] == "cpu" and "graph_ms" not in r
    base = [r for r in rows if r["competitor"] == "base"]
    assert all(r["ratio_wall"] == 1.0 for r in base)
    ref = next(r for r in rows if r["competitor"] == "reference" and r["mode"] == "train")
    assert ref["vs_peft_wall"] > 0 and ref["vs_crab_wall"] > 0 and ref["saved_bytes"] > 0
    dec = next(r for r in rows if r["competitor"] == "reference" and r["mode"] == "decode")
    assert dec["floor_ratio"] == pytest.approx(C.decode_byte_floor(cases[1])) and "saved_bytes" not in dec
    text = writers.short_table(rows, ["base", "peft", "crab-loop", "reference"])
    assert "decode" in text and "p=0.1" in text


def test_without_matplotlib_the_run_says_it_skipped_the_plots(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rc = R.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path), "--no-train", "--competitors", "base",
                 "--only", r"^qwen\.q_proj .*N=(1|16) r=128 K=3 decode$"])
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


# ---------------------------------------------------------------------------------------------------------------
# the stages of scripts/gpu_check.sh, each in its dry run (a subprocess: the Triton interpreter must be switched on
# before triton is imported, and this process imported it already)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_stage(module: str, *args: str):
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}", "--dry-run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def gpu_check_work(tmp_path_factory):
    """One dry run of every stage module into one work folder, as scripts/gpu_check.sh lays it out (concurrently)."""
    work = tmp_path_factory.mktemp("gpu-check")
    procs = {
        "ceilings": _start_stage("gpu_ceilings", "--out-md", str(work / "ceilings.md"),
                                 "--out-json", str(work / "ceilings.json")),
        "correctness": _start_stage("gpu_correctness", "--backends", "reference,triton,cuda", "--shapes", "odd",
                                    "--out-md", str(work / "correctness-a.md"),
                                    "--out-json", str(work / "correctness-a.json")),
        "sweep": _start_stage("gpu_sweep", "--out-md", str(work / "sweep.md"), "--out-json", str(work / "sweep.json")),
        "profile": _start_stage("gpu_profile", "--competitors", "base,triton,cuda", "--dropouts", "0",
                                "--out-txt", str(work / "profile.txt"), "--out-json", str(work / "profile.json")),
    }
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}{err[-4000:]}"
        outputs[name] = out
    return work, outputs


def test_ceilings_dry_run_table(gpu_check_work):
    work, out = gpu_check_work
    import json

    data = json.loads((work / "ceilings.json").read_text())
    assert data["dry_run"] and data["gemm_tflops"] > 0 and data["copy_tbps"] > 0
    assert "| probe |" in (work / "ceilings.md").read_text() and "TB/s" in out["ceilings"]


def test_correctness_dry_run_table(gpu_check_work):
    work, out = gpu_check_work
    import json

    rows = json.loads((work / "correctness-a.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"reference", "triton", "cpu"}   # cpu stands in for cuda
    assert {(r["dtype"], r["p"]) for r in rows} == {(d, p) for d in ("bfloat16", "float16", "float32")
                                                   for p in (0.0, 0.1)}
    for r in rows:
        if r["backend"] == "triton" and r["dtype"] == "bfloat16":
            assert r["status"].startswith("unavailable")   # refused under the interpreter
        else:
            assert r["status"] == "PASS", r
            assert set(r["errors"]) == {"y", "g", "dx", "d_router_weight", "d_lora_a", "d_lora_b"}
    assert all(r["poison"] == "triton _empty hook" for r in rows if r["backend"] == "triton" and "poison" in r)
    md = (work / "correctness-a.md").read_text()
    assert "| shape | dims | dtype |" in md and "PyTorch's own error" in md
    assert "PASS" in out["correctness"]


def test_correctness_catches_unwritten_outputs(monkeypatch):
    """A backend whose output keeps the poison (NaN) fails its row, naming the output."""
    from benchmarks import gpu_common as G
    from benchmarks import gpu_correctness as GC

    foc, f64 = GC._helpers()
    real = foc.run_layer

    def leaky(*args, **kwargs):
        y, g, grads = real(*args, **kwargs)
        grads[4][0, 0] = float("nan")                  # d lora_a left partly unwritten
        return y, g, grads

    monkeypatch.setattr(foc, "run_layer", leaky)
    rows = GC.check_case(foc, f64, torch.device("cpu"), GC.DRY_SHAPES[0], torch.float32, 0.1, ["reference"], 3,
                         G.Deadline(None))
    assert rows[0]["status"] == "FAIL: d_lora_a non-finite"


def test_sweep_dry_run_table(gpu_check_work):
    work, out = gpu_check_work
    import json

    data = json.loads((work / "sweep.json").read_text())
    assert data["error"] is None
    kernels = {r["kernel"] for r in data["rows"]}
    assert kernels == {"_base_expand_kernel", "cublas", "_shrink_route_kernel"}
    tuned = [r for r in data["rows"] if r["kernel"] == "_base_expand_kernel"]
    assert len(tuned) >= 2 and all(r["ms"] > 0 and r["max_rel_err"] < 1e-4 for r in tuned)
    assert "### base + expand GEMM" in out["sweep"] and "### shrink-route" in out["sweep"]


def test_profile_dry_run_table(gpu_check_work):
    work, out = gpu_check_work
    text = (work / "profile.txt").read_text()
    for name in ("base", "triton", "cpu"):
        assert f"== {name} (" in text
    assert "aten::mm" in text and "busy" in text


def test_summary_reads_every_stage(gpu_check_work, tmp_path):
    from benchmarks import gpu_summary

    work, _ = gpu_check_work
    (work / "stages.tsv").write_text("ceilings\tok\t3\t30\tceilings.log\n"
                                     "pytest cuda\tTIMEOUT\t45\t45\tpytest-cuda.log\n")
    (work / "pytest-cuda.log").write_text("tests/test_cuda_backend.py::test_a PASSED [ 50%]\n")
    rc = R.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path), "--stem", "stem", "--no-train",
                 "--competitors", "base,reference", "--only", r"^qwen\.k_proj .*N=1 r=128 K=3 decode$"])
    assert rc == 0
    lines = gpu_summary.build_summary(str(work), str(tmp_path / "stem.csv"), str(tmp_path / "correctness.md"),
                                      ["summary.txt"], 12.0, 545.0, dry_run=True)
    text = "\n".join(lines)
    for piece in ("GPU CHECK SUMMARY (DRY RUN", "pytest cuda  TIMEOUT", "ceilings: GEMM", "correctness vs float64",
                  "pytest cuda: no result line", "so far: 1 passed", "timings (", "qwen.k_proj", "tile sweep",
                  "profile (one fwd+bwd", "returned files (1)"):
        assert piece in text, piece
    assert "| shape | dims |" in (tmp_path / "correctness.md").read_text()


def test_gpu_check_script_returns_at_most_8_files():
    import re
    import subprocess

    script = os.path.join(REPO, "scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    returned = re.search(r"RETURNED=\(([^)]*)\)", text, re.S).group(1).split()
    assert len(returned) <= 8 and "summary.txt" in returned and "logs.tar.gz" in returned
    assert "set -uo pipefail" in text and "MAX_RETURNED=8" in text


def test_decode_benchmark_runs_and_its_layers_agree(capsys):
    """benchmarks.decode on tiny layers: a row per rank, the byte floor of the cost model, and the packed and the
    separate-tensor layers computing the same output (so the comparison is like for like)."""
    from benchmarks import decode

    rows = decode.main(["--d-in", "16", "--d-out", "24", "--ranks", "4", "--layers", "2", "--rounds", "1",
                        "--calls", "4", "--threads", "1"])
    assert [r["rank"] for r in rows] == [4] and all(rows[0][k] > 0 for k in ("base", "ilora", "plain LoRA K=1"))
    assert rows[0]["byte floor"] == pytest.approx((24 * 16 + 7 * 16 + 24 * 12) / (24 * 16))
    assert "ilora / floor" in capsys.readouterr().out
    torch.manual_seed(0)
    layer = ik.ILoRALinear(torch.nn.Linear(16, 24), r=4, num_heads=3, alpha=8, dropout=0.0, backend="cpu").eval()
    with torch.no_grad():
        layer.lora_b.normal_()
        x = torch.randn(3, 16)
        torch.testing.assert_close(decode._unpacked(layer)(x), layer(x), rtol=1e-6, atol=1e-6)
