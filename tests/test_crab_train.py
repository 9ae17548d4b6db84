"""The Crab+ trainer on the tiny Qwen2.5-Omni thinker (CPU): the loss falls, checkpoints hold only the adapter,
resuming reproduces the uninterrupted loss curve, and a 2-process gloo run matches the 1-process run.

The training data here is text-only (learnable "question -> answer" chat turns per task) so the tests exercise the
trainer, not media decoding (the data tests cover that)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ilora_kernels.crab.config import config_from_dict  # noqa: E402
from ilora_kernels.crab.train import CONFIG_COPY, ROUTER_STATS_FILE, build_model, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["ks", "avqa"]
WORDS = ["drum", "bell", "flute", "horn"]


def _processor():
    from ilora_kernels.crab.model import build_tiny_processor
    return build_tiny_processor()


def text_dataset(processor, n=16, seed=0):
    """Chat-like samples 'task ks: <word>. Answer: <word after it>' with labels on the answer span only."""
    tok = processor.tokenizer
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        w = int(torch.randint(0, len(WORDS), (1,), generator=gen))
        shift = 1 if task == "ks" else 2
        prompt = tok(f"<|im_start|>user\n{task}: the {WORDS[w]}<|im_end|>\n<|im_start|>assistant\n").input_ids
        answer = tok(f"Answer: {WORDS[(w + shift) % len(WORDS)]}<|im_end|>").input_ids
        ids = torch.tensor(prompt + answer)
        labels = ids.clone()
        labels[: len(prompt)] = -100
        items.append({"input_ids": ids, "labels": labels, "task": task})
    return items


def pad_collate(batch):
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], mask[i, :k], labels[i, :k] = b["input_ids"], 1, b["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": [b["task"] for b in batch]}


def tiny_config(out, dropout=0.1, **training):
    t = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
             logging_steps=1, save_steps=100, progress_bar=False, gradient_checkpointing=True)
    t.update(training)
    return config_from_dict({"model": {"name_or_path": "tiny", "tiny_init_std": 0.2},
                             "ilora": {"r": 8, "num_heads": 3, "alpha": 16, "dropout": dropout},
                             "data": {"tasks": TASKS}, "training": t})


def run(cfg, processor, data, resume=None, callbacks=None):
    model, processor = build_model(cfg)
    return train(cfg, resume=resume, model=model, processor=processor, train_dataset=data,
                 data_collator=pad_collate, callbacks=callbacks)


def losses(out):
    return {e["step"]: e["loss"] for e in out["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def processor():
    return _processor()


@pytest.fixture(autouse=True)
def _one_thread():
    """The toy GEMMs gain nothing from intra-op threads, and on a busy machine OpenMP spin-waiting makes them
    orders of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loss_falls_and_logs_per_task_and_router_stats(tmp_path, processor):
    cfg = tiny_config(tmp_path / "run", max_steps=16, logging_steps=4)
    out = run(cfg, processor, text_dataset(processor, n=16))
    curve = [v for _, v in sorted(losses(out).items())]
    assert len(curve) == 4 and curve[-1] < 0.6 * curve[0], curve
    entry = [e for e in out["log_history"] if "loss" in e][-1]
    for task in TASKS:
        assert f"loss/{task}" in entry
        heads = [entry[f"router/{task}/head{h}"] for h in (1, 2, 3)]
        assert abs(sum(heads) - 1) < 1e-3
        assert 0 <= entry[f"router/{task}/entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6
    lines = (tmp_path / "run" / ROUTER_STATS_FILE).read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[-1])["tasks"]) == set(TASKS)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


class _StopAt:
    """A callback that stops training after `step` optimizer steps (an interruption)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True
                return control
        return Stop()


def test_checkpoint_holds_only_the_adapter_and_resume_reproduces_the_curve(tmp_path, processor):
    data = text_dataset(processor, n=16)  # 4 batches per epoch: the run crosses an epoch boundary
    full = run(tiny_config(tmp_path / "full", save_steps=4), processor, data)

    cut = run(tiny_config(tmp_path / "cut", save_steps=4), processor, data, callbacks=[_StopAt(4)])
    assert cut["global_step"] == 4
    ckpt = tmp_path / "cut" / "checkpoint-4"
    files = sorted(p.name for p in ckpt.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and CONFIG_COPY in files
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(files)
    assert not {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"} & set(files), files

    from safetensors.torch import load_file
    tensors = load_file(ckpt / "adapter_model.safetensors")
    assert tensors and all(k.rsplit(".", 1)[1] in ("router_weight", "lora_a", "lora_b") for k in tensors)
    assert len(tensors) == 3 * 26  # 26 adapted modules in the tiny thinker
    optim = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_state = sum(v.numel() for s in optim["state"].values() for v in s.values() if torch.is_tensor(v) and v.dim())
    # the optimizer holds the adapter parameters only (text-only batches leave the encoders' adapters without state)
    assert sum(len(g["params"]) for g in optim["param_groups"]) == len(tensors)
    assert 0 < n_state <= 2 * sum(t.numel() for t in tensors.values())

    resumed = run(tiny_config(tmp_path / "cut", save_steps=4), processor, data, resume=str(ckpt))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # steps 1-4 come back from the checkpoint's trainer state
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    for step, value in losses(cut).items():
        assert value == pytest.approx(a[step], rel=1e-6)


def test_resume_rejects_a_folder_without_an_adapter(tmp_path, processor):
    (tmp_path / "bogus").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        run(tiny_config(tmp_path / "run", max_steps=2), processor, text_dataset(processor, n=8),
            resume=str(tmp_path / "bogus"))


WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_crab_train import _processor, run, text_dataset, tiny_config, losses
    out_dir, batch = sys.argv[1], int(sys.argv[2])
    p = _processor()
    cfg = tiny_config(out_dir, dropout=0.0, max_steps=4, per_device_train_batch_size=batch)
    out = run(cfg, p, text_dataset(p, n=16))
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        json.dump(losses(out), open(out_dir + "/losses.json", "w"))
    if dist.is_initialized():  # a clean gloo shutdown (else a rank can abort at exit)
        dist.barrier()
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, str(script), str(tmp_path / "two"), "2"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "losses.json").read_text())
    b = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert sorted(a) == sorted(b) == ["1", "2", "3", "4"]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (a, b)


def test_bf16_base_keeps_fp32_adapter_weights_and_trains_under_autocast(processor):
    cfg = config_from_dict({"model": {"name_or_path": "tiny", "dtype": "bfloat16", "tiny_init_std": 0.2},
                            "ilora": {"r": 8, "num_heads": 3, "alpha": 16, "dropout": 0.0},
                            "data": {"tasks": TASKS}})
    model, _ = build_model(cfg, processor=processor)
    from ilora_kernels import ilora_layers

    layer = next(m for name, m in ilora_layers(model).items() if "language_model" in name)  # text-only batch
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == torch.float32
    batch = pad_collate(text_dataset(processor, n=2))
    batch.pop("task")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_b.grad is not None and layer.lora_b.grad.dtype == torch.float32
