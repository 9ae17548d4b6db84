"""Liger-style convergence: a tiny patched model trains, and with the adapter disabled it is the unpatched model."""

import copy

import torch

import ilora_kernels as ik
from ilora_kernels.patching import set_adapter_enabled
from tiny_models import pattern_batch, tiny_llama


def _train(model, steps, lr, params=None):
    ids = pattern_batch(model.config.vocab_size, seed=3)
    opt = torch.optim.AdamW(params if params is not None else [p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_patched_model_loss_falls():
    torch.manual_seed(0)
    model = tiny_llama()
    ik.apply_ilora(model, ik.ILoRAConfig(r=8, num_heads=3, alpha=16, dropout=0.1))
    model.train()
    losses = _train(model, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_disabled_adapter_reproduces_unpatched_training_exactly():
    torch.manual_seed(0)
    plain = tiny_llama()
    patched = copy.deepcopy(plain)
    ik.apply_ilora(patched, ik.ILoRAConfig(r=4, num_heads=3, alpha=8))
    set_adapter_enabled(patched, False)
    for p in patched.parameters():  # train the base in both, adapter off in the patched one
        p.requires_grad_(True)
    def base_params(m):
        return [p for n, p in m.named_parameters() if not n.rsplit(".", 1)[-1].startswith(("lora_", "router_"))]

    torch.manual_seed(1)
    a = _train(plain, steps=5, lr=1e-3, params=base_params(plain))
    torch.manual_seed(1)
    b = _train(patched, steps=5, lr=1e-3, params=base_params(patched))
    assert a == b
