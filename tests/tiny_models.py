"""Tiny Hugging Face models built from configs with random weights (no hub access)."""

import torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg)


def tiny_whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    cfg = WhisperConfig(vocab_size=60, num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=40, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=40,
                        max_source_positions=16)
    return WhisperEncoder(cfg)


def token_batch(vocab, batch=2, seq=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def pattern_batch(vocab, batch=4, seq=16, step=5, seed=0):
    """Learnable sequences: each row is an arithmetic progression modulo vocab from a random start."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    return (start + step * torch.arange(seq)) % vocab


def patched_tiny_model(build=tiny_qwen2, seed=0, **cfg):
    """``build()`` patched with I-LoRA (r=4, K=3, alpha=8, no dropout unless ``cfg`` says otherwise), its B heads
    drawn from N(0, 1) so that the adapter changes the outputs; seeded."""
    import ilora_kernels as ik

    torch.manual_seed(seed)
    model = build()
    ik.apply_ilora(model, ik.ILoRAConfig(**{"r": 4, "num_heads": 3, "alpha": 8, "dropout": 0.0, **cfg}))
    with torch.no_grad():
        for layer in ik.ilora_layers(model).values():
            layer.lora_b.normal_()
    return model
