"""``ilora-crab``: the Crab+ trainer's command line (also ``python -m ilora_kernels.crab``).

    ilora-crab train      --config configs/crab_plus.yaml --data-root /data/AVUIE [--resume latest]
    ilora-crab eval       --adapter runs/crab_plus --data-root /data/AVUIE --output results.json
    ilora-crab generate   --adapter runs/crab_plus --video clip.mp4 --audio clip.wav --question "What plays?"
    ilora-crab report     --single st_ks.json st_ave.json --multi mt.json [--router mt.json --plot-out router.png]
    ilora-crab demo-data  --data-root runs/demo/data
    ilora-crab demo       (the whole CPU demo: data, single- and multi-task fine-tuning, evaluation, report)

Every option of ``train`` and ``eval`` overrides the matching key of the YAML config (``--config``); without a
config the Crab+ recipe defaults apply. Multi-GPU: ``accelerate launch --config_file
configs/accelerate/zero2.yaml -m ilora_kernels.crab train ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..ops.registry import BACKENDS
from .tasks import TASK_KEYS
from .threads import set_threads

SKIPPED_SAMPLES_FILE = "skipped_samples.json"


class CommandError(Exception):
    """A user-facing error of a command: printed as one line ``ilora-crab <command>: error: ...``, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# missing optional dependencies: one line naming the extra to install, no traceback

# top-level module -> (what to install, the extra that brings it); crab.* commands need the [crab] extra
MODULE_EXTRAS: Dict[str, tuple] = {
    "av": ("PyAV", "crab"), "soundfile": ("soundfile", "crab"), "PIL": ("Pillow", "crab"),
    "transformers": ("transformers", "crab"), "accelerate": ("accelerate", "crab"), "yaml": ("PyYAML", "crab"),
    "matplotlib": ("matplotlib", "crab"), "tqdm": ("tqdm", "crab"), "peft": ("PEFT", "peft"),
}
TORCHVISION_HINT = ("needs torchvision built for your torch (the Qwen2.5-Omni video processor imports it; no extra "
                    "installs it, so that pip never replaces your torch): pip install torch==2.14.1 "
                    "torchvision==0.29.1 (the Makefile's pins), or the torchvision release matching your torch")


def missing_extra_message(exc: BaseException) -> Optional[str]:
    """The one-line hint for an ImportError caused by a missing optional dependency (walks the exception chain),
    or None when the error is something else."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ImportError):
            name = (getattr(e, "name", None) or "").split(".")[0]
            if name in MODULE_EXTRAS:
                what, extra = MODULE_EXTRAS[name]
                return (f"this command needs {what} (module {name!r}), which is not installed: install the [{extra}] "
                        f"extra: pip install 'ilora-kernels[{extra}]' (from a checkout: pip install "
                        f"--no-build-isolation -e '.[{extra}]')")
            if name == "torchvision" or "requires the Torchvision library" in str(e):
                return TORCHVISION_HINT
        e = e.__cause__ or e.__context__
    return None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch intra-op CPU threads per process (also OMP_NUM_THREADS/MKL_NUM_THREADS for "
                        "workers); default OMP_NUM_THREADS when set, else min(cores, 8) divided by the processes "
                        "on this machine (LOCAL_WORLD_SIZE / WORLD_SIZE). Warns when threads x processes exceed "
                        "the cores")


# ---------------------------------------------------------------------------------------------------------------
# samples: loaded here, skips counted, printed and recorded

def load_cli_samples(cfg, split: str):
    """``crab.train.load_samples`` (the config's data options and per-task cap); its errors (empty task file, null
    target, missing media) become one-line ``CommandError``s."""
    from .data import MediaError
    from .train import load_samples

    try:
        return load_samples(cfg, split)
    except (ValueError, MediaError) as exc:
        raise CommandError(str(exc)) from None


def report_skips(samples, split: str, out_dir=None, options: Optional[dict] = None) -> dict:
    """Prints the skipped-sample counts (per task and reason) and, with ``out_dir``, writes them to
    ``<out_dir>/skipped_samples.json``. Returns the JSON record."""
    kept = samples.kept_per_task()
    record = {"split": split, **(options or {}), **samples.skips.to_dict(kept)}
    print(samples.skips.format(f"{split} samples", kept), flush=True)
    if out_dir is not None:
        path = Path(out_dir) / SKIPPED_SAMPLES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"skip counts: {path}")
    return record


def _tasks(value: str) -> List[str]:
    return [t.strip() for t in value.replace(",", " ").split() if t.strip()]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH_OR_ID", help="Qwen2.5-Omni checkpoint: a local folder or a hub id "
                   "(config key model.name_or_path; default Qwen/Qwen2.5-Omni-7B)")
    g.add_argument("--model-config", choices=["tiny"], help="'tiny': build the toy Qwen2.5-Omni thinker with random "
                   "weights and a locally made processor instead of loading a checkpoint (demo, tests)")
    g.add_argument("--backend", choices=("auto",) + BACKENDS,
                   help="I-LoRA kernel backend (ilora.backend; default auto = fastest for the device)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-root", metavar="DIR", help="AV-UIE v2 root holding AVUIE_2/<task>/ (or the AVUIE_2 "
                   "folder itself) (data.root)")
    g.add_argument("--tasks", type=_tasks, metavar="KEYS", help="task keys, comma- or space-separated, e.g. "
                   "'ks,ave' (data.tasks; default: the config's list)")
    g.add_argument("--prompts", metavar="FILE", help="JSON prompt file replacing the built-in instruction wording "
                   "(data.prompts)")
    g.add_argument("--skip-missing-media", action="store_true", default=None,
                   help="skip samples whose media is missing or unreadable and print how many were skipped per "
                        "task (train: also in <output-dir>/skipped_samples.json; eval: in the results JSON), "
                        "instead of stopping with an error naming the sample (data.skip_missing_media)")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="skip (and count, like --skip-missing-media) samples whose target is null, missing or "
                        "empty or whose media field is missing, and tasks whose split file holds no samples ([]), "
                        "instead of stopping with an error naming the file, task and sample (data.skip_bad_samples)")
    g.add_argument("--num-frames", type=int, metavar="N", help="video frames per clip (data.num_frames; 10)")
    g.add_argument("--frame-size", type=int, metavar="PX", help="frame side in pixels (data.frame_size; 224)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ilora-crab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run 'ilora-crab <command> --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,generate,report,demo-data,demo}")
    sub.required = True

    # ---- train
    p = sub.add_parser("train", help="fine-tune I-LoRA on AV-UIE v2 tasks (Hugging Face Trainer, Accelerate)",
                       description="Fine-tunes I-LoRA on a frozen Qwen2.5-Omni thinker. Checkpoints hold only the "
                                   "adapter (save_ilora format) plus optimizer/scheduler/RNG/trainer state. Logs "
                                   "per-task loss and router statistics.")
    p.add_argument("--config", metavar="YAML", help="recipe config, e.g. configs/crab_plus.yaml or "
                   "configs/demo_cpu.yaml (default: the Crab+ recipe defaults)")
    _add_model_args(p)
    _add_data_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", metavar="DIR", help="where checkpoints, logs and the final adapter go "
                   "(training.output_dir)")
    g.add_argument("--resume", metavar="CHECKPOINT", help="resume from a checkpoint-N folder, or 'latest' for the "
                   "newest one in the output dir")
    g.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps; overrides the epochs "
                   "(training.max_steps)")
    g.add_argument("--epochs", type=float, metavar="E", help="training epochs (training.num_train_epochs; 5)")
    g.add_argument("--batch-size", type=int, metavar="B", help="per-device batch size "
                   "(training.per_device_train_batch_size)")
    g.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps "
                   "(training.gradient_accumulation_steps)")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (training.learning_rate; 1e-4)")
    g.add_argument("--seed", type=int, help="random seed (training.seed; 42)")
    g.add_argument("--save-steps", type=int, metavar="N", help="checkpoint every N steps (training.save_steps)")
    g.add_argument("--logging-steps", type=int, metavar="N", help="log every N steps (training.logging_steps)")
    g.add_argument("--max-train-samples-per-task", type=int, metavar="N",
                   help="cap the training samples of each task (data.max_train_samples_per_task)")
    g.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="turn gradient checkpointing off (training.gradient_checkpointing)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (training.progress_bar)")
    _add_threads_arg(g)
    g = p.add_argument_group("I-LoRA")
    g.add_argument("--r", type=int, help="rank (ilora.r; 128)")
    g.add_argument("--heads", type=int, help="router heads K (ilora.num_heads; 3; 1 = plain LoRA)")
    g.add_argument("--alpha", type=float, help="scaling numerator, s = alpha/r (ilora.alpha; 256)")
    g.add_argument("--dropout", type=float, help="LoRA dropout (ilora.dropout; 0.1)")

    # ---- eval
    p = sub.add_parser("eval", help="generate on the test split and score every task (results JSON)",
                       description="Greedy generation on a split, answer extraction, per-task metrics (accuracy, "
                                   "AVVP segment/event F1, IoU), router statistics; writes a results JSON.")
    p.add_argument("--adapter", required=True, metavar="DIR", help="folder holding adapter_model.safetensors (a "
                   "training output dir or a checkpoint-N folder)")
    p.add_argument("--config", metavar="YAML", help="recipe config (default: <adapter>/crab_config.yaml when "
                   "present, else the Crab+ defaults)")
    _add_model_args(p)
    _add_data_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--split", choices=["train", "test"], help="which split to evaluate (eval.split; test)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="generation length (eval.max_new_tokens)")
    g.add_argument("--max-samples-per-task", type=int, metavar="N", help="evaluate at most N samples per task "
                   "(data.max_eval_samples_per_task)")
    g.add_argument("--output", metavar="JSON", help="results file (default <adapter>/results_<split>.json)")
    g.add_argument("--run-name", help="name stored in the results JSON (default: the adapter folder name)")
    g.add_argument("--router-plot", metavar="PNG", help="also write the router plot (mean weight per head per "
                   "task) here")
    g.add_argument("--no-router-stats", action="store_true", help="do not collect router statistics")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_threads_arg(g)

    # ---- generate
    p = sub.add_parser("generate", help="one answer from a video / audio / image and a question with a trained "
                       "adapter", description=GENERATE_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, metavar="DIR", help="folder holding adapter_model.safetensors (a "
                   "training output dir or a checkpoint-N folder, as eval takes)")
    p.add_argument("--config", metavar="YAML", help="recipe config (default: <adapter>/crab_config.yaml when "
                   "present, else the Crab+ defaults): model, frames, frame size, prompt file, generation length")
    _add_model_args(p)
    g = p.add_argument_group("input")
    g.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (twice for a2v: "
                   "first and second candidate, in order)")
    g.add_argument("--audio", action="append", default=[], metavar="PATH", help="an audio file (or a video file's "
                   "audio track; twice for v2a)")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (image tasks: arig, "
                   "s4, ms3, ref_avs)")
    g.add_argument("--question", metavar="TEXT", help="the question (the sample's own question text: it fills the "
                   "task instruction's {question} slot, or follows it). Without --task it is the whole "
                   "instruction")
    g.add_argument("--task", choices=TASK_KEYS, metavar="KEY", help="use this task's instruction wording "
                   "from the prompt file, as in training (the media given must be the task's: e.g. ks takes one "
                   "--video and one --audio, a2v two --video and one --audio)")
    g.add_argument("--prompts", metavar="FILE", help="JSON prompt file replacing the built-in wording (data.prompts)")
    g.add_argument("--num-frames", type=int, metavar="N", help="video frames per clip (data.num_frames)")
    g.add_argument("--frame-size", type=int, metavar="PX", help="frame side in pixels (data.frame_size)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=_positive_int, metavar="N", help="generation length (default the "
                   "config's eval.max_new_tokens)")
    g.add_argument("--show-prompt", action="store_true", help="also print the chat text the prompt was rendered "
                   "to (before the media placeholders are expanded)")
    _add_threads_arg(g)

    # ---- report
    p = sub.add_parser("report", help="transfer table (single- vs multi-task) and the router plot",
                       description="Per-task delta table multi-task minus single-task with n and a 95% interval "
                                   "for every score and delta (Wilson / Newcombe for accuracy, bootstrap over "
                                   "samples otherwise; 'within noise' when the delta's interval contains 0), and "
                                   "the share of tasks with positive transfer (the Crab+ headline metric). Warns "
                                   "when every score is 0. Optionally the router plot.")
    p.add_argument("--single", nargs="+", metavar="JSON", help="results JSONs of the single-task runs, one task "
                   "per file (a file holding several tasks is refused: it is a multi-task result)")
    p.add_argument("--multi", metavar="JSON", help="results JSON of the multi-task run (several tasks; a file "
                   "holding one task is refused)")
    p.add_argument("--threshold", type=float, default=0.0, help="a delta above this counts as positive transfer "
                   "(default 0)")
    p.add_argument("--output-json", metavar="JSON", help="also write the table as JSON")
    p.add_argument("--router", metavar="JSON", help="results JSON (or router summary) to plot the router weights "
                   "of")
    p.add_argument("--plot-out", metavar="PNG", default="router.png", help="router plot path (default router.png)")

    # ---- demo-data
    p = sub.add_parser("demo-data", help="write the synthetic AV-UIE v2 demo dataset",
                       description="Writes <data-root>/AVUIE_2/<task>/{train,test}.json with short procedurally "
                                   "generated videos and audio in which the answers are present.")
    p.add_argument("--data-root", required=True, metavar="DIR", help="where to write (AVUIE_2/ is created inside)")
    p.add_argument("--tasks", type=_tasks, default=None, metavar="KEYS", help="demo task keys (default "
                   "ave,avqa,ks,a2v)")
    p.add_argument("--n-train", type=int, default=24, help="training samples per task (default 24)")
    p.add_argument("--n-test", type=int, default=8, help="test samples per task (default 8)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")

    # ---- demo
    from .demo import add_demo_arguments
    p = sub.add_parser("demo", help="the CPU demo end to end (what `make demo` runs)",
                       description="Generates the demo data, fine-tunes the tiny thinker with I-LoRA through the "
                                   "fused kernels (single-task runs, the multi-task run, LoRA K=1 vs I-LoRA K=3 "
                                   "as time allows), evaluates, prints per-task metrics, the transfer table and "
                                   "the router plot path. About 5-8 minutes on 2 CPU cores.")
    add_demo_arguments(p)
    return parser


def _overrides(a: argparse.Namespace) -> dict:
    o = {}
    if getattr(a, "model_config", None) == "tiny":
        o["model.name_or_path"] = "tiny"
    elif getattr(a, "model", None):
        o["model.name_or_path"] = a.model
    o["ilora.backend"] = getattr(a, "backend", None)
    o["data.root"] = getattr(a, "data_root", None)
    o["data.tasks"] = getattr(a, "tasks", None)
    o["data.prompts"] = getattr(a, "prompts", None)
    o["data.skip_missing_media"] = getattr(a, "skip_missing_media", None)
    o["data.skip_bad_samples"] = True if getattr(a, "skip_bad_samples", False) else None
    o["data.num_frames"] = getattr(a, "num_frames", None)
    o["data.frame_size"] = getattr(a, "frame_size", None)
    return o


def cmd_train(a: argparse.Namespace) -> int:
    set_threads(a.threads, "train")
    from .config import load_config
    from .train import build_dataset, build_model, load_prompt_file, train

    o = _overrides(a)
    o.update({"training.output_dir": a.output_dir, "training.max_steps": a.max_steps,
              "training.num_train_epochs": a.epochs, "training.per_device_train_batch_size": a.batch_size,
              "training.gradient_accumulation_steps": a.grad_accum, "training.learning_rate": a.lr,
              "training.seed": a.seed, "training.save_steps": a.save_steps,
              "training.logging_steps": a.logging_steps,
              "data.max_train_samples_per_task": a.max_train_samples_per_task,
              "ilora.r": a.r, "ilora.num_heads": a.heads, "ilora.alpha": a.alpha, "ilora.dropout": a.dropout})
    if a.no_gradient_checkpointing:
        o["training.gradient_checkpointing"] = False
    if a.no_progress:
        o["training.progress_bar"] = False
    cfg = load_config(a.config, o)
    main_process = int(os.environ.get("RANK", "0")) == 0

    # the samples are read here (not inside train()) so that the skip counts are printed and recorded before the
    # model is built; build_model + build_dataset + train(model=..., train_dataset=...) is train()'s own route
    samples = load_cli_samples(cfg, "train")
    if main_process:
        report_skips(samples, "train", cfg.training.output_dir,
                     {"skip_missing_media": bool(cfg.data.skip_missing_media),
                      "skip_bad_samples": bool(cfg.data.skip_bad_samples)})
    if not samples:
        raise CommandError(f"no training samples for tasks {cfg.data.tasks} under {cfg.data.root}")
    model, processor = build_model(cfg)
    dataset = build_dataset(cfg, processor, samples, prompts=load_prompt_file(cfg))
    out = train(cfg, resume=a.resume, model=model, processor=processor, train_dataset=dataset)
    _shutdown_distributed()
    if main_process:
        print(f"trained {out['global_step']} steps in {out['train_seconds']:.1f} s; final train loss "
              f"{out['train_loss']:.4f}; adapter in {out['output_dir']}")
    return 0


def _shutdown_distributed() -> None:
    """Destroys the process group of a multi-process launch, so that no rank aborts at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_eval(a: argparse.Namespace) -> int:
    set_threads(a.threads, "eval")
    from ..adapters import load_ilora
    from .config import load_config
    from .evaluate import evaluate_samples, format_metrics, write_results
    from .train import CONFIG_COPY, build_model, load_prompt_file

    adapter = Path(a.adapter)
    config = a.config
    if config is None and (adapter / CONFIG_COPY).is_file():
        config = adapter / CONFIG_COPY
    o = _overrides(a)
    o.update({"eval.split": a.split, "eval.max_new_tokens": a.max_new_tokens,
              "data.max_eval_samples_per_task": a.max_samples_per_task})
    cfg = load_config(config, o)
    samples = load_cli_samples(cfg, cfg.eval.split)
    skipped = report_skips(samples, cfg.eval.split, None,
                           {"skip_missing_media": bool(cfg.data.skip_missing_media),
                            "skip_bad_samples": bool(cfg.data.skip_bad_samples)})
    if not samples:
        raise CommandError(f"no {cfg.eval.split} samples for tasks {cfg.data.tasks} under {cfg.data.root}")
    import torch

    model, processor = build_model(cfg, apply_adapter=False,
                                   device="cuda" if torch.cuda.is_available() else None)
    load_ilora(model, adapter)
    run_name = a.run_name or adapter.name
    results = evaluate_samples(model, processor, list(samples), max_new_tokens=cfg.eval.max_new_tokens,
                               prompts=load_prompt_file(cfg), num_frames=cfg.data.num_frames,
                               frame_size=cfg.data.frame_size, collect_router=not a.no_router_stats,
                               progress=not a.no_progress, run_name=run_name,
                               upstream_media=cfg.data.upstream_media)
    results["skipped"] = skipped
    out = Path(a.output) if a.output else adapter / f"results_{cfg.eval.split}.json"
    write_results(results, out)
    print(format_metrics(results))
    print(f"results: {out}")
    if a.router_plot and results.get("router"):
        from .report import plot_router
        print(f"router plot: {plot_router(results['router'], a.router_plot, run=run_name)}")
    return 0


GENERATE_DESCRIPTION = """\
Greedy generation of one answer from the given media and question with a trained adapter, through the prompt
building of training and evaluation (crab.data.build_generation_inputs on a crab.data.Sample: system prompt, the
media kind's intro, the media placeholders, the instruction). Prints the raw generation and the answer parsed from
it (crab.evaluate.parse_answer: <answer> tags, else 'Answer:', else the last line).

  --task KEY [--question TEXT]   the task's instruction wording from the prompt file (its {question} slot filled
                                 with TEXT, or TEXT appended), exactly as a sample of that task is prompted
  --question TEXT                the question itself is the instruction; the intro follows the media given
                                 (one --video/--audio: video_audio, two --video: a2v, two --audio: v2a,
                                 --image: image_audio)

  ilora-crab generate --adapter runs/crab_plus --task ks --video clip.mp4 --audio clip.wav
  ilora-crab generate --adapter runs/crab_plus --video clip.mp4 --audio clip.wav --question "What instrument plays?"
"""

# the task whose media layout (intro, placeholders) a bare --question takes, per media kind
FREE_QUESTION_TASK = {"video_audio": "avqa", "a2v": "a2v", "v2a": "v2a", "image_audio": "arig"}


def _media_counts(media: Dict[str, list]) -> Dict[str, int]:
    return {k: len(v) for k, v in media.items() if v}


def _describe_media(counts: Dict[str, int]) -> str:
    parts = [f"{n} --{k}" for k, n in counts.items() if n]
    return " and ".join(parts) if parts else "no media"


def question_sample(media: Dict[str, list], question: Optional[str] = None, task: Optional[str] = None,
                    prompts: Optional[dict] = None):
    """(``crab.data.Sample``, prompts) for ``generate``: ``media`` maps "video" / "audio" / "image" to paths (in
    order). With ``task``: a sample of that task (its instruction wording, ``question`` as the sample's own
    question), the media must be the task's. Without: the question is the whole instruction (``prompts`` copied
    with that task's instruction replaced by ``{question}``), in the media layout of ``FREE_QUESTION_TASK``."""
    import copy

    from .data import Sample
    from .prompts import load_prompts
    from .tasks import MEDIA_FIELDS, TASKS

    counts = _media_counts(media)
    if not counts:
        raise CommandError("give at least one of --video, --audio, --image")
    layouts = {kind: {k: sum(1 for _, kk, _ in fields if kk == k) for k in ("video", "audio", "image")}
               for kind, fields in MEDIA_FIELDS.items()}
    layouts = {kind: {k: n for k, n in c.items() if n} for kind, c in layouts.items()}
    prompts = copy.deepcopy(load_prompts() if prompts is None else prompts)
    if task is not None:
        want = layouts[TASKS[task].media]
        if counts != want:
            raise CommandError(f"task {task!r} takes {_describe_media(want)} (as its samples in training), got "
                               f"{_describe_media(counts)}")
    else:
        if not question or not question.strip():
            raise CommandError("give --question TEXT (or --task KEY for a task's own instruction)")
        if counts.get("image") and counts.get("video"):
            raise CommandError("give --image or --video, not both")
        if any(n > 4 for n in counts.values()):
            raise CommandError(f"at most 4 files of each kind, got {_describe_media(counts)}")
        kind = next((k for k, c in layouts.items() if c == counts), None)
        if kind is None:
            kind = "image_audio" if counts.get("image") else "video_audio"
        task = FREE_QUESTION_TASK[kind]
        prompts["tasks"][task] = "{question}"
    missing = [(k, p) for k, paths in media.items() for p in paths if not Path(p).is_file()]
    if missing:
        kind, path = missing[0]
        raise CommandError(f"--{kind} {path}: file not found")
    sample = Sample(task=task, index=0, target="", instruction=(question or "").strip(),
                    media={k: [Path(p).expanduser().absolute() for p in v] for k, v in media.items() if v})
    return sample, prompts


def cmd_generate(a: argparse.Namespace) -> int:
    from ..adapters import CONFIG_NAME

    adapter = Path(a.adapter)
    if not adapter.is_dir():
        raise CommandError(f"--adapter {adapter}: adapter folder not found")
    if not (adapter / CONFIG_NAME).is_file():
        raise CommandError(f"--adapter {adapter}: no {CONFIG_NAME} there (a trained run's adapter folder: a "
                           f"training output dir or a checkpoint-N folder)")
    set_threads(a.threads, "generate")
    from ..adapters import load_ilora
    from ..patching import ilora_layers
    from .config import load_config
    from .data import MediaError, build_messages
    from .evaluate import generate_answer
    from .train import CONFIG_COPY, build_model, load_prompt_file

    config = a.config
    if config is None and (adapter / CONFIG_COPY).is_file():
        config = adapter / CONFIG_COPY
    o = _overrides(a)
    o.update({"eval.max_new_tokens": a.max_new_tokens})
    cfg = load_config(config, o)
    media = {"video": list(a.video), "audio": list(a.audio), "image": list(a.image)}
    sample, prompts = question_sample(media, a.question, a.task, load_prompt_file(cfg))
    import torch

    model, processor = build_model(cfg, apply_adapter=False,
                                   device="cuda" if torch.cuda.is_available() else None)
    load_ilora(model, adapter)
    if a.backend:
        for layer in ilora_layers(model).values():
            layer.backend = a.backend
    if a.show_prompt:
        text = processor.apply_chat_template(build_messages(sample, prompts, with_answer=False), tokenize=False,
                                             add_generation_prompt=True)
        print("prompt:")
        print(text, flush=True)
    try:
        out = generate_answer(model, processor, sample, max_new_tokens=cfg.eval.max_new_tokens, prompts=prompts,
                              num_frames=cfg.data.num_frames, frame_size=cfg.data.frame_size,
                              upstream_media=cfg.data.upstream_media)
    except MediaError as exc:
        raise CommandError(str(exc)) from None
    print("generation:")
    print(out["generation"])
    print(f"answer: {out['answer']}", flush=True)
    if out["cut_by_length"]:
        print(f"ilora-crab generate: warning: the generation reached --max-new-tokens {cfg.eval.max_new_tokens} "
              f"without an end-of-sequence token: the answer may be missing", file=sys.stderr)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import format_router, format_transfer, plot_router, table_json, transfer_table

    did = False
    try:
        if a.single or a.multi:
            if not (a.single and a.multi):
                raise CommandError("--single and --multi go together")
            table = transfer_table(a.single, a.multi, threshold=a.threshold)
            print(format_transfer(table))
            if a.output_json:
                Path(a.output_json).write_text(json.dumps(table_json(table), indent=2) + "\n")
            did = True
        if a.router:
            print(format_router(a.router))
            print(f"router plot: {plot_router(a.router, a.plot_out)}")
            did = True
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if not did:
        raise CommandError("give --single and --multi (transfer table) and/or --router (router plot)")
    return 0


def cmd_demo_data(a: argparse.Namespace) -> int:
    import time

    from .demo_data import DEMO_TASKS, write_demo_dataset

    start = time.perf_counter()
    tasks = a.tasks or list(DEMO_TASKS)
    base = write_demo_dataset(a.data_root, tasks=tasks, n_train=a.n_train, n_test=a.n_test, seed=a.seed)
    print(f"wrote {len(tasks)} tasks x ({a.n_train} train + {a.n_test} test) to {base} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, FileNotFoundError, CommandError) as exc:
        print(f"ilora-crab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        hint = missing_extra_message(exc)
        if hint is None:
            raise
        print(f"ilora-crab {args.command}: error: {hint}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return cmd_train(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "report":
        return cmd_report(args)
    if args.command == "demo-data":
        return cmd_demo_data(args)
    from .demo import run_demo
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
