"""The ilora-crab command line around the trainer: --threads (default, environment, oversubscription warning),
skipped samples counted, printed and recorded (train: <output-dir>/skipped_samples.json; eval: the results JSON),
bad samples and empty task files named in one error line, and a missing optional dependency named with the extra
to install. The trainer, the model and the generation are replaced by stand-ins: these tests check the CLI only."""

import json
import os
import sys

import pytest
import torch

from ilora_kernels.crab import cli, threads
from ilora_kernels.crab.cli import main, missing_extra_message
from ilora_kernels.crab.tasks import TASKS
from ilora_kernels.crab.threads import default_threads, local_world_size, set_threads


@pytest.fixture
def restore_threads(monkeypatch):
    """set_threads changes torch's threads and OMP/MKL_NUM_THREADS: put them back afterwards."""
    threads = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
        monkeypatch.delenv(var)
    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ threads
def test_default_threads_share_the_cores_among_local_processes():
    assert default_threads(cores=2, processes=1) == 2
    assert default_threads(cores=64, processes=1) == 8          # never more than 8 by default
    assert default_threads(cores=16, processes=4) == 2
    assert default_threads(cores=2, processes=4) == 1           # at least one
    assert local_world_size({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}) == 2
    assert local_world_size({"WORLD_SIZE": "4"}) == 4 and local_world_size({}) == 1


def test_set_threads_sets_torch_and_env_and_warns_on_oversubscription(restore_threads, monkeypatch, capsys):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    env = {}
    assert set_threads(None, "train", env=env) == 2 and torch.get_num_threads() == 2
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2" and capsys.readouterr().err == ""
    env = {"LOCAL_WORLD_SIZE": "2"}
    assert set_threads(None, "train", env=env) == 1 and capsys.readouterr().err == ""
    assert set_threads(None, "eval", env={"OMP_NUM_THREADS": "1"}) == 1       # an explicit OMP_NUM_THREADS wins
    env = {"LOCAL_WORLD_SIZE": "2"}
    assert set_threads(2, "train", env=env) == 2 and torch.get_num_threads() == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "warning: 2 threads x 2 processes = 4 > 2 CPU cores" in err and "--threads 1" in err
    set_threads(2, "train", env={"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"})   # other local ranks stay quiet
    assert capsys.readouterr().err == ""


def test_threads_options_in_help_and_demo_keeps_one_thread(capsys):
    for cmd in ("train", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--threads" in text and "--skip-bad-samples" in text
    assert cli.build_parser().parse_args(["demo"]).threads == 1
    assert cli.build_parser().parse_args(["train", "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--threads", "0"])


# ------------------------------------------------------------------------------------------------------ skipped samples
def _data(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("soundfile")
    from ilora_kernels.crab import demo_data

    root = tmp_path / "data"
    demo_data.write_demo_dataset(root, tasks=("ks", "a2v"), n_train=4, n_test=3, seed=1)
    base = root / "AVUIE_2"
    for split in ("train", "test"):
        items = json.loads((base / "ks" / f"{split}.json").read_text())
        (base / "ks" / "audio" / items[0]["audio_path"]).unlink()          # missing media
        items[2][TASKS["ks"].layout(split).target[0]] = None              # a null target (test: "action")
        (base / "ks" / f"{split}.json").write_text(json.dumps(items))
    return root, base


@pytest.fixture
def fake_trainer(monkeypatch):
    """build_model / build_dataset / train stand-ins that record what the CLI hands them."""
    import ilora_kernels.crab.train as T

    seen = {}

    def fake_train(cfg, resume=None, model=None, processor=None, train_dataset=None, **kwargs):
        seen.update(threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"), model=model,
                    tasks=sorted({s.task for s in train_dataset}), n=len(train_dataset))
        return {"output_dir": cfg.training.output_dir, "global_step": 0, "train_seconds": 0.0, "train_loss": 0.0}

    monkeypatch.setattr(T, "build_model", lambda cfg, **kwargs: ("model", "processor"))
    monkeypatch.setattr(T, "build_dataset", lambda cfg, processor, samples, prompts=None: samples)
    monkeypatch.setattr(T, "train", fake_train)
    return seen


def test_train_counts_prints_and_records_skipped_samples(tmp_path, restore_threads, fake_trainer, capsys):
    root, base = _data(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--model-config", "tiny", "--data-root", str(root), "--tasks", "ks,a2v", "--output-dir",
            str(run), "--threads", "1", "--no-progress"]
    # without the opt-ins: one error line naming the task, sample and file; no traceback, nothing trained
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "'ks'" in err and "sample 0" in err
    assert main(args + ["--skip-missing-media"]) == 2
    err = capsys.readouterr().err
    assert "sample 2" in err and str(base / "ks" / "train.json") in err and "null" in err and not fake_trainer
    # with both: trained on what is left, counts printed before training and recorded in the output folder
    assert main(args + ["--skip-missing-media", "--skip-bad-samples"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 train samples: ks 2 (missing_media 1, null_target 1)" in out
    assert fake_trainer["n"] == 6 and fake_trainer["tasks"] == ["a2v", "ks"] and fake_trainer["model"] == "model"
    assert fake_trainer["threads"] == 1 and fake_trainer["omp"] == "1"           # set before the work started
    record = json.loads((run / "skipped_samples.json").read_text())
    assert record["split"] == "train" and record["total"] == 2 and record["skip_bad_samples"] is True
    assert record["by_task"] == {"ks": {"missing_media": 1, "null_target": 1}} and record["kept"] == {"ks": 2, "a2v": 4}
    assert record["examples"] == {"ks": {"missing_media": [0], "null_target": [2]}}


def test_train_refuses_an_empty_task_file_by_name(tmp_path, restore_threads, fake_trainer, capsys):
    root, base = _data(tmp_path)
    (base / "a2v" / "train.json").write_text("[]")
    args = ["train", "--model-config", "tiny", "--data-root", str(root), "--tasks", "a2v,ks", "--output-dir",
            str(tmp_path / "run"), "--threads", "1", "--skip-missing-media"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(base / "a2v" / "train.json") in err and "no samples" in err and not fake_trainer
    assert main(args + ["--skip-bad-samples"]) == 0
    out = capsys.readouterr().out
    assert f"task 'a2v': {base / 'a2v' / 'train.json'} holds no samples" in out and fake_trainer["tasks"] == ["ks"]
    record = json.loads((tmp_path / "run" / "skipped_samples.json").read_text())
    assert record["empty_tasks"] == {"a2v": str(base / "a2v" / "train.json")} and record["kept"]["a2v"] == 0


def test_eval_prints_and_records_skipped_samples_in_the_results(tmp_path, restore_threads, monkeypatch, capsys):
    import ilora_kernels.adapters as A
    import ilora_kernels.crab.evaluate as E
    import ilora_kernels.crab.train as T

    root, base = _data(tmp_path)
    seen = {}

    def fake_evaluate(model, processor, samples, run_name="", **kwargs):
        seen.update(n=len(samples), threads=torch.get_num_threads())
        return {"run": run_name, "tasks": {"ks": {"metric": "accuracy", "score": 0.0, "n": 1}}, "predictions": [],
                "router": None}

    monkeypatch.setattr(T, "build_model", lambda cfg, **kwargs: ("model", "processor"))
    monkeypatch.setattr(A, "load_ilora", lambda model, path: None)
    monkeypatch.setattr(E, "evaluate_samples", fake_evaluate)
    out = tmp_path / "res.json"
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--model-config", "tiny", "--data-root", str(root),
                 "--tasks", "ks,a2v", "--output", str(out), "--threads", "1", "--skip-missing-media",
                 "--skip-bad-samples", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "skipped 2 test samples: ks 2 (missing_media 1, null_target 1)" in text and seen == {"n": 4, "threads": 1}
    assert "WARNING: every score is 0" in text                                   # eval's own table says it too
    skipped = json.loads(out.read_text())["skipped"]
    assert skipped["split"] == "test" and skipped["by_task"] == {"ks": {"missing_media": 1, "null_target": 1}}


# ------------------------------------------------------------------------------------------------------ missing extras
def test_missing_av_names_the_crab_extra_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)                 # as if PyAV were not installed
    assert main(["demo-data", "--data-root", str(tmp_path / "d"), "--tasks", "ks", "--n-train", "1",
                 "--n-test", "1"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "ModuleNotFoundError" not in err
    assert err.startswith("ilora-crab demo-data: error:") and "pip install 'ilora-kernels[crab]'" in err
    assert "'av'" in err


def test_missing_extra_message_follows_the_exception_chain():
    try:
        try:
            import transformers_not_here  # noqa: F401
        except ModuleNotFoundError as e:
            e.name = "transformers"
            raise ImportError("the Crab+ trainer needs transformers>=5.0") from e
    except ImportError as exc:
        assert "[crab]" in missing_extra_message(exc)
    assert "torchvision" in missing_extra_message(ImportError("Qwen2VLVideoProcessor requires the Torchvision "
                                                              "library but it was not found"))
    assert missing_extra_message(ModuleNotFoundError("No module named 'somethingelse'", name="somethingelse")) is None
    assert "[peft]" in missing_extra_message(ModuleNotFoundError("x", name="peft.tuners"))
