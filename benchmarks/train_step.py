"""The training-step benchmark: 2 Qwen2 decoder layers with adapters on all seven projections, I-LoRA against
the Crab+ loop, with and without gradient checkpointing (fwd+bwd, no optimizer step; tokens/s and CUDA peak memory).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from typing import Dict, List

import torch

from ilora_kernels.ops.registry import resolve_backend

from . import competitors as C
from .runner import Budget, Terminated, error_text, log


def train_step_rows(device: torch.device, dtype: torch.dtype, meta: Dict, budget: Budget, tiny: bool,
                    tokens: int = 4096, steps: int = 3) -> List[Dict]:
    rows: List[Dict] = []
    try:
        from transformers import Qwen2Config, Qwen2Model
    except Exception as exc:
        return [{**meta, "shape": "train.qwen2x2", "competitor": "-", "error": f"unavailable: {error_text(exc)}"}]
    import ilora_kernels as ik

    if tiny:
        cfg_kw = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
        tokens, r, k, steps = 32, 8, 3, 2
    else:  # Qwen2.5-Omni-7B thinker LLM widths
        cfg_kw = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
        r, k = 128, 3
    shape = f"train.qwen2x2 ({'tiny' if tiny else '7B widths'})"
    targets = ik.CRAB_PLUS_TARGETS
    for variant in ("ilora", "crab-loop"):
        for ckpt in (False, True):
            row = {**meta, "shape": shape, "d_in": cfg_kw["hidden_size"], "d_out": cfg_kw["intermediate_size"],
                   "n": tokens, "r": r, "k": k, "competitor": variant}
            rows.append(row)
            if budget.spent():
                row["error"] = f"skipped: time budget of {budget.seconds:g} s spent"
                continue
            model = None
            try:
                cfg = Qwen2Config(num_hidden_layers=2, vocab_size=128, max_position_embeddings=max(tokens, 128),
                                  **cfg_kw)
                cfg._attn_implementation = "sdpa"
                with torch.device(device):
                    model = Qwen2Model(cfg).to(dtype)
                if variant == "ilora":
                    model = ik.apply_ilora(model, ik.ILoRAConfig(r=r, num_heads=k, alpha=2.0 * r, dropout=0.1,
                                                                 target_modules=targets))
                    for layer in ik.ilora_layers(model).values():  # random B: no zero shortcut
                        torch.nn.init.normal_(layer.lora_b, std=0.1 / math.sqrt(r))
                    x0 = torch.zeros(1, 1, cfg.hidden_size, device=device, dtype=dtype)
                    first = next(iter(ik.ilora_layers(model).values()))
                    backend = resolve_backend(first.backend, x0)
                    row["note"] = f"backend={backend}"
                else:
                    model = C.apply_crab_loop(model, targets, r, k, 2.0 * r, dropout=0.1)
                    row["note"] = "Crab+ loop module"
                row["note"] += f", dropout 0.1, grad_ckpt={'on' if ckpt else 'off'}, fwd+bwd (no optimizer step)"
                model.train()
                if ckpt:
                    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
                        warnings.simplefilter("ignore", FutureWarning)
                        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                emb = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)
                params = [p for p in model.parameters() if p.requires_grad]

                def step():
                    out = model(inputs_embeds=emb).last_hidden_state
                    loss = out.float().pow(2).mean()
                    return torch.autograd.grad(loss, params)

                step()  # warm-up (compilation, autotuning)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    grads = step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    del grads
                if device.type == "cuda":
                    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
                med = statistics.median(times)
                row["fwdbwd_ms"] = med * 1e3
                row["fwdbwd_p20_ms"], row["fwdbwd_p80_ms"] = min(times) * 1e3, max(times) * 1e3
                row["tokens_per_s"] = tokens / med
            except Terminated:
                row["error"] = "terminated"
                raise
            except Exception as exc:
                row["error"] = error_text(exc)
            finally:
                model = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"[train] {variant} grad_ckpt={ckpt}: "
                f"{row.get('tokens_per_s', 0):.0f} tok/s {row.get('error', '')}")
    return rows
