"""The Crab+ trainer on the engines the README's multi-GPU recipes use, on CPU with gloo and 2 processes: DDP
(torchrun), FSDP1 (``configs/accelerate/fsdp_cpu.yaml``, the route ``fsdp.yaml`` configures), FSDP2 (the same file
with ``--fsdp_version 2``) and DeepSpeed ZeRO-2 (``configs/accelerate/zero2.yaml``). Per engine: an uninterrupted
run; a run SIGKILLed (every process) after checkpoint-3 is complete, either at step 5 or half-way through writing
checkpoint-6; and ``--resume latest``, which must skip the half-written checkpoint and reproduce the uninterrupted
loss curve and adapter. Every run is checked against the single-process run, and every checkpoint for frozen base
weights.

Tolerances (fp32, the same data order on 1 and 2 processes): resumed vs uninterrupted run of the same engine, loss
and adapter within 1e-6 (measured: identical, every engine); 2 processes vs 1, loss within 1e-5 relative (measured
<= 4.8e-7 absolute) and adapter within 1e-4 absolute (measured 2.2e-5: Adam divides by sqrt(v), which magnifies the
rounding differences of the gradient all-reduce in entries whose gradients are tiny).

``pytest -m "not distributed"`` deselects the multi-process tests (about 2.5 minutes on 2 cores, plus about 30 s the
first time DeepSpeed builds its CPU communication op; the ZeRO-2 ones need DeepSpeed, requirements-deepspeed.txt,
and skip without it).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "crab_dist_worker.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

RESUME_TOL = 1e-6     # resumed vs uninterrupted, same engine
LOSS_RTOL = 1e-5      # 2 processes vs 1
ADAPTER_TOL = 1e-4    # 2 processes vs 1, max |difference|


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launcher(engine: str):
    if engine == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port()]
    if engine in ("fsdp1", "fsdp2"):
        cmd = ACCELERATE + ["--config_file", str(ROOT / "configs/accelerate/fsdp_cpu.yaml")]
        return cmd + (["--fsdp_version", "2"] if engine == "fsdp2" else []) + ["--main_process_port", _port()]
    if engine == "zero2":
        return ACCELERATE + ["--config_file", str(ROOT / "configs/accelerate/zero2.yaml"), "--num_processes", "2",
                             "--main_process_port", _port()]
    raise ValueError(engine)


ENGINES = {  # engine -> (the name the trainer reports, how the run is interrupted)
    "ddp": ("DDP", "--pause-in-save"),
    "fsdp1": ("FSDP1", "--pause-at"),
    "fsdp2": ("FSDP2", "--pause-in-save"),
    "zero2": ("DeepSpeed ZeRO-2", "--pause-at"),
}
PAUSE_STEP = {"--pause-at": 5, "--pause-in-save": 6}


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "LOCAL_RANK",
                                                                    "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _start(cmd, out: Path, log: str):
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True), f


def _tail(out: Path, log: str) -> str:
    return (out / log).read_text()[-4000:]


def _kill(proc, out: Path) -> None:
    """SIGKILL: every rank (torchrun starts each in a session of its own), then the launcher's process group."""
    for pid_file in (out / "pids").glob("*"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def run_to_end(cmd, out: Path, log: str, timeout=240) -> dict:
    start = time.perf_counter()
    proc, f = _start(cmd, out, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, out)
        raise
    finally:
        f.close()
    assert rc == 0, _tail(out, log)
    result = json.loads((out / "result.json").read_text())
    result["seconds"] = time.perf_counter() - start
    result["log"] = (out / log).read_text()
    return result


def run_until_paused(cmd, out: Path, log: str, timeout=240) -> str:
    proc, f = _start(cmd, out, log)
    deadline = time.monotonic() + timeout
    try:
        while not (out / "paused").is_file():
            assert proc.poll() is None, f"exited ({proc.returncode}) before the pause:\n{_tail(out, log)}"
            assert time.monotonic() < deadline, f"no pause within {timeout} s:\n{_tail(out, log)}"
            time.sleep(0.05)
        time.sleep(0.3)  # the other rank reaches its pause too
        return (out / "paused").read_text().strip()
    finally:
        _kill(proc, out)
        f.close()


def losses(result) -> dict:
    return {int(k): v for k, v in result["losses"].items()}


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run_dir / "adapter_model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _need(engine):
    if engine == "zero2":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (requirements-deepspeed.txt)")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run (batch 4 = 2 x 2)."""
    out = tmp_path_factory.mktemp("single")
    return dict(run_to_end([sys.executable, str(WORKER), str(out), "--batch", "4"], out, "log.txt"), dir=out / "run")


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request):
    _need(request.param)
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{engine}-full")
    result = run_to_end(_launcher(engine) + [str(WORKER), str(out)], out, "log.txt")
    return dict(result, dir=out / "run")


@pytest.fixture(scope="module")
def resumed(engine, tmp_path_factory):
    """Killed (SIGKILL, every process) after checkpoint-3 is complete, then ``--resume latest``."""
    out = tmp_path_factory.mktemp(f"{engine}-cut")
    how = ENGINES[engine][1]
    start = time.perf_counter()
    paused = run_until_paused(_launcher(engine) + [str(WORKER), str(out), how, str(PAUSE_STEP[how])], out, "cut.txt")
    killed_at = {"--pause-at": "step 5", "--pause-in-save": "in save 6"}[how]
    assert paused == killed_at
    ckpts = sorted(p.name for p in (out / "run").glob("checkpoint-*"))
    router_lines_at_kill = len((out / "run" / "router_stats.jsonl").read_text().splitlines())
    (out / "paused").unlink()
    result = run_to_end(_launcher(engine) + [str(WORKER), str(out), "--resume", "latest"], out, "resume.txt")
    return dict(result, dir=out / "run", checkpoints_at_kill=ckpts, how=how,
                router_lines_at_kill=router_lines_at_kill, seconds=time.perf_counter() - start)


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_the_engine_is_the_one_configured(engine, uninterrupted):
    name = ENGINES[engine][0]
    assert uninterrupted["engine"]["name"] == name and uninterrupted["engine"]["world_size"] == 2, \
        uninterrupted["engine"]
    assert uninterrupted["engine"]["backend"] == "gloo"
    assert f"engine: {name}, 2 processes (gloo)" in uninterrupted["log"]  # the start banner
    marker = json.loads((uninterrupted["dir"] / "checkpoint-3" / "checkpoint_complete.json").read_text())
    assert marker["engine"] == name and marker["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_two_processes_match_the_single_process_run(uninterrupted, single):
    a, b = losses(single), losses(uninterrupted)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), (step, a, b)
    d = max_abs_diff(adapter(uninterrupted["dir"]), adapter(single["dir"]))
    print(f"MEASURED {uninterrupted['engine']['name']}: 2 vs 1 process loss max abs diff "
          f"{max(abs(a[s] - b[s]) for s in a):.3g}, adapter max abs diff {d:.3g}; "
          f"runtime {uninterrupted['seconds']:.1f} s")
    assert d <= ADAPTER_TOL


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_kill_then_resume_latest_reproduces_the_uninterrupted_run(engine, resumed, uninterrupted, single):
    assert resumed["global_step"] == 8
    if resumed["how"] == "--pause-in-save":  # checkpoint-6 was half-written when the run was killed
        assert resumed["checkpoints_at_kill"] == ["checkpoint-3", "checkpoint-6"]
        assert "note: skipped checkpoint-6: no checkpoint_complete.json" in resumed["log"], resumed["log"][-3000:]
    else:
        assert resumed["checkpoints_at_kill"] == ["checkpoint-3"]
    assert f"resume: {resumed['dir'] / 'checkpoint-3'} (step 3)" in resumed["log"]
    a, b = losses(uninterrupted), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # steps 1-3 come back from the checkpoint's trainer state
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=RESUME_TOL, rel=RESUME_TOL), (step, a, b)
    final = adapter(resumed["dir"])
    d_full, d_single = max_abs_diff(final, adapter(uninterrupted["dir"])), max_abs_diff(final, adapter(single["dir"]))
    print(f"MEASURED {engine}: resumed vs uninterrupted loss max abs diff {max(abs(a[s] - b[s]) for s in a):.3g}, "
          f"adapter {d_full:.3g}; vs single process adapter {d_single:.3g}; kill+resume {resumed['seconds']:.1f} s")
    assert d_full <= RESUME_TOL
    assert d_single <= ADAPTER_TOL
    for folder in ("checkpoint-3", "checkpoint-6"):  # checkpoint-6 written again, complete, after the resume
        assert (resumed["dir"] / folder / "checkpoint_complete.json").is_file()


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_router_stats_list_each_step_once_after_the_resume(resumed):
    lines = (resumed["dir"] / "router_stats.jsonl").read_text().splitlines()
    assert resumed["router_lines_at_kill"] > 3  # the killed run had logged steps past checkpoint-3
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def _tensor_keys(obj, prefix=""):
    """(key, tensor) pairs anywhere in a nested dict / list of a torch.load-ed file."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensor_keys(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensor_keys(v, f"{prefix}{i}.")
    elif torch.is_tensor(obj):
        yield prefix[:-1], obj


@pytest.fixture(scope="module")
def frozen():
    """(the names of the frozen base parameters, their bytes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from crab_dist_worker import build_reference_model

    model = build_reference_model()
    names = {n for n, p in model.named_parameters() if not p.requires_grad}
    return names, sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_checkpoints_hold_no_frozen_base_weight(engine, uninterrupted, frozen):
    from safetensors.torch import load_file

    names, base_bytes = frozen
    folders = sorted(uninterrupted["dir"].glob("checkpoint-*"))
    assert [f.name for f in folders] == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    for folder in folders:
        files = [p for p in folder.rglob("*") if p.is_file()]
        adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
        total = sum(p.stat().st_size for p in files)
        # the adapter and Adam's two moments; DeepSpeed adds its own copy of the trainable weights and the fp32
        # master partitions: 5 adapter sizes. Plus 192 KiB of small files (RNG states, zero_to_fp32.py, ...).
        bound = (5 if engine == "zero2" else 3) * adapter_bytes + 192 * 1024
        print(f"MEASURED {engine} {folder.name}: {total} bytes (adapter {adapter_bytes}, bound {bound}, frozen base "
              f"{base_bytes})")
        assert total <= bound, (folder, total, bound, {p.name: p.stat().st_size for p in files})
        assert total + base_bytes > bound  # the frozen base in a checkpoint would break the bound
        for p in files:
            if p.suffix == ".safetensors":
                keys = list(load_file(p))
            elif p.suffix in (".pt", ".pth", ".bin"):
                keys = [k for k, _ in _tensor_keys(torch.load(p, map_location="cpu", weights_only=False))]
            else:
                continue
            leaked = [k for k in keys for n in names if f".{n}." in f".{k}."]
            assert not leaked, (p, leaked[:5])


# ---------------------------------------------------------------------------------------------------------------
# in-process: which checkpoint `--resume latest` takes, the compact log line

def _checkpoint(root: Path, step: int, complete=True, files=("adapter_model.safetensors", "optimizer.pt")):
    from ilora_kernels.crab.train import write_checkpoint_marker

    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x" * 100)
    (folder / "sub" / "part.pt").write_bytes(b"y" * 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_checkpoint_marker(folder, global_step=step)
    return folder


def test_resume_latest_takes_the_newest_complete_checkpoint_and_names_the_skipped_ones(tmp_path):
    from ilora_kernels.crab.train import checkpoint_problem, latest_complete_checkpoint, resolve_resume

    good = _checkpoint(tmp_path, 2)
    cut = _checkpoint(tmp_path, 4)
    (cut / "optimizer.pt").write_bytes(b"x" * 7)           # truncated after the marker was written
    gone = _checkpoint(tmp_path, 5)
    (gone / "sub" / "part.pt").unlink()                     # a deletion killed half-way
    half = _checkpoint(tmp_path, 6, complete=False)         # killed before the marker
    (tmp_path / "checkpoint-x").mkdir()                     # not a checkpoint name
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(cut) == "optimizer.pt has 7 bytes, 100 when the checkpoint was written"
    assert checkpoint_problem(gone) == "sub/part.pt is missing"
    assert "no checkpoint_complete.json" in checkpoint_problem(half)
    folder, skipped = latest_complete_checkpoint(tmp_path)
    assert folder == good and [f.name for f, _ in skipped] == ["checkpoint-6", "checkpoint-5", "checkpoint-4"]
    resume, notes = resolve_resume("latest", tmp_path)
    assert resume == str(good) and notes[0].startswith("skipped checkpoint-6: no checkpoint_complete.json")
    (good / "checkpoint_complete.json").write_text("{not json")
    assert "unreadable" in checkpoint_problem(good)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-.*skipped checkpoint-6"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint-4 is incomplete: optimizer.pt has 7 bytes"):
        resolve_resume(str(cut), tmp_path)
    resume, notes = resolve_resume(str(half), tmp_path)     # a folder without a marker: taken, with a note
    assert resume == str(half) and "has no checkpoint_complete.json" in notes[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    assert resolve_resume(None, tmp_path) == (None, [])


def test_rotation_keeps_complete_checkpoints_only(tmp_path):
    from ilora_kernels.crab.train import _rotate_checkpoints

    for step in (1, 2, 3):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 4, complete=False)
    _rotate_checkpoints(tmp_path, 2, keep=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_a_log_entry_is_one_short_line():
    from ilora_kernels.crab.train import format_log_line

    logs = {"loss": 5.78621, "grad_norm": 3.0123, "learning_rate": 0.0081174, "epoch": 1.0, "loss/ks": 6.101,
            "loss/avqa": 5.4701, "total_flos": 1e9, "custom": 2}
    for task in ("ks", "avqa"):
        logs.update({f"router/{task}/head1": 0.331, f"router/{task}/head2": 0.3236, f"router/{task}/head3": 0.3454,
                     f"router/{task}/entropy": 0.9867})
    line = format_log_line(logs, max_steps=8, step=4, seconds_per_step=0.051)
    assert line == ("step 4/8  loss 5.7862 (ks 6.101, avqa 5.470)  lr 8.12e-03  grad 3.01  epoch 1.00  "
                    "router ks .33/.32/.35 H0.99, avqa .33/.32/.35 H0.99  0.05 s/step  custom 2")
    done = format_log_line({"train_runtime": 12.34, "train_loss": 5.17391, "train_samples_per_second": 3.0,
                            "epoch": 2.0}, step=8)
    assert done == "done: 8 steps in 12.3 s, mean train loss 5.1739"


def test_an_fsdp_renamed_model_saves_what_save_ilora_saves(tmp_path):
    """FSDP1 names the modules of its units ``..._fsdp_wrapped_module...`` (and FSDP2 swaps the model's class):
    ``save_ilora`` then writes the record it writes for the unwrapped model."""
    sys.path.insert(0, str(ROOT / "tests"))
    import ilora_kernels as ik
    from ilora_kernels.adapters import _sha256, adapter_state_dict
    from ilora_kernels.crab.train import _save_adapter_state
    from tiny_models import patched_tiny_model

    model = patched_tiny_model(seed=1)
    ik.save_ilora(model, tmp_path / "plain")
    tensors = adapter_state_dict(model)

    class Unit(torch.nn.Module):  # what FSDP1's auto-wrap puts where a decoder layer was
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = Unit(layers[i])
    assert any("_fsdp_wrapped_module" in name for name in ik.ilora_layers(model))
    from safetensors.torch import load_file

    def record(folder):  # the config but the weights' checksum (safetensors orders its metadata at random), weights
        meta = json.loads((folder / "adapter_config.json").read_text())
        assert meta.pop("weights_sha256") == _sha256(folder / "adapter_model.safetensors")
        return meta, load_file(folder / "adapter_model.safetensors")

    ik.save_ilora(model, tmp_path / "renamed", tensors=tensors)
    gathered = {f"_fsdp_wrapped_module.{k}": v for k, v in tensors.items()}
    _save_adapter_state(model, gathered, tmp_path / "gathered")
    plain_meta, plain_weights = record(tmp_path / "plain")
    for folder in ("renamed", "gathered"):
        meta, weights = record(tmp_path / folder)
        assert meta == plain_meta and weights.keys() == plain_weights.keys()
        assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    with pytest.raises(KeyError, match="do not match"):
        ik.save_ilora(model, tmp_path / "bad", tensors=dict(list(tensors.items())[1:]))
