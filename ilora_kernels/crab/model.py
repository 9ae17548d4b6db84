"""Model side of the Crab+ trainer: the Qwen2.5-Omni thinker (real or tiny), its processor, and I-LoRA on it.

Real model (kept for users; never run by the tests, no hub is reachable here)::

    thinker = load_thinker("Qwen/Qwen2.5-Omni-7B", torch_dtype=torch.bfloat16)     # or a local folder
    processor = load_processor("Qwen/Qwen2.5-Omni-7B")
    apply_crab_ilora(thinker, gradient_checkpointing=True)                         # 388 modules, ~870M params

Tiny model (``--model-config tiny``; demo and tests; CPU, no hub)::

    processor = build_tiny_processor()            # byte-level BPE tokenizer trained offline, tiny Whisper features
    thinker = build_tiny_thinker(seed=0)          # same architecture, toy size, random weights

The tiny thinker and the tiny processor agree by construction: the special token ids are fixed (see
``TINY_SPECIAL_TOKENS``), the tokenizer is built deterministically, and ``n_mels`` / patch / merge sizes match.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

__all__ = [
    "QWEN_OMNI_MIN_TRANSFORMERS", "CRAB_ILORA_TARGET_REGEX", "TINY_SPECIAL_TOKENS", "QWEN_OMNI_CHAT_TEMPLATE",
    "load_thinker", "load_processor", "build_tiny_thinker", "build_tiny_processor", "apply_crab_ilora",
    "crab_ilora_targets", "expected_crab_ilora_count", "count_parameters",
]

# Qwen2.5-Omni (thinker + processor) arrived in transformers 4.52; this code is written and tested against 5.24
# (processor kwargs such as ``load_audio_from_video`` and ``rope_parameters`` in configs are transformers-5 API).
QWEN_OMNI_MIN_TRANSFORMERS = "5.0"

# SPEC section 4: the seven suffixes across the whole thinker = LLM layers (q,k,v,o,gate,up,down), audio tower
# self-attention (q,k,v: it has no gate/up/down and its output projection is ``out_proj``), vision tower MLP
# (gate,up,down: its attention uses ``attn.q``/``attn.k``/``attn.v``/``attn.proj``). Written as an explicit regex so
# nothing else can match (e.g. the vision merger's ``mlp.0``/``mlp.2``, ``lm_head``, a talker if present).
# Qwen2.5-Omni-7B: 28 * 7 + 32 * 3 + 32 * 3 = 196 + 96 + 96 = 388 modules.
CRAB_ILORA_TARGET_REGEX = (
    r"(?:.*\.)?(?:"
    r"language_model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"|audio_tower\.layers\.\d+\.self_attn\.[qkv]_proj"
    r"|visual\.blocks\.\d+\.mlp\.(?:gate|up|down)_proj"
    r")"
)

# Special tokens of the Qwen2.5-Omni chat template and processor, with the ids the tiny tokenizer gives them.
TINY_SPECIAL_TOKENS: Dict[str, str] = {
    "pad_token": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "vision_pad": "<|vision_pad|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
}

# Qwen2.5-Omni's chat template (same structure as the released one): media parts become
# <|vision_bos|><|VIDEO|><|vision_eos|>, <|vision_bos|><|IMAGE|><|vision_eos|>, <|audio_bos|><|AUDIO|><|audio_eos|>;
# the processor then expands each placeholder to the right number of tokens.
QWEN_OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _require_qwen_omni():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise ImportError("the Crab+ trainer needs transformers>=5.0 (tested with 5.24.0): "
                          "pip install 'transformers==5.24.0'") from e
    try:
        from transformers import (  # noqa: F401
            Qwen2_5OmniProcessor,
            Qwen2_5OmniThinkerConfig,
            Qwen2_5OmniThinkerForConditionalGeneration,
        )
    except ImportError as e:
        raise ImportError(
            f"the installed transformers {transformers.__version__} lacks Qwen2_5OmniThinkerForConditionalGeneration "
            f"/ Qwen2_5OmniProcessor; the Crab+ trainer needs transformers>={QWEN_OMNI_MIN_TRANSFORMERS} "
            f"(tested with 5.24.0): pip install 'transformers==5.24.0'") from e
    return transformers


# ----------------------------------------------------------------------------------------------------------- real
def load_thinker(model_name_or_path: Union[str, Path], torch_dtype: Union[str, torch.dtype] = "auto",
                 attn_implementation: str = "sdpa", device_map=None, **kwargs) -> nn.Module:
    """Loads the Qwen2.5-Omni *thinker* (the talker and token2wav are not loaded) from a local folder or hub id.

    ``model_name_or_path`` is either a full Qwen2.5-Omni checkpoint (e.g. ``Qwen/Qwen2.5-Omni-7B``, whose weights
    are prefixed ``thinker.``/``talker.``) or a folder holding a saved thinker. ``torch_dtype``: ``torch.bfloat16``
    for GPU training (the Crab+ recipe), ``torch.float32`` on CPU. Use ``attn_implementation="flash_attention_2"``
    where flash-attn is installed. Returned as ``from_pretrained`` returns it (eval mode; the Trainer switches to train
    mode), with ``config.use_cache`` off for training. Tested on locally saved tiny checkpoints of both layouts."""
    _require_qwen_omni()
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    load_kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs)  # v5: dtype=
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    config = AutoConfig.from_pretrained(model_name_or_path)
    if getattr(config, "model_type", None) == "qwen2_5_omni":
        # Full Omni checkpoint (thinker + talker + token2wav, weights prefixed "thinker." / "talker." / ...): build
        # only the thinker from its sub-config and strip the prefix; the talker's weights are skipped, not loaded.
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            model_name_or_path, config=config.thinker_config, key_mapping={r"^thinker\.": ""}, **load_kwargs)
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_name_or_path, **load_kwargs)
    model.config.use_cache = False
    return model


def load_processor(model_name_or_path: Union[str, Path], **kwargs):
    """``Qwen2_5OmniProcessor.from_pretrained`` (tokenizer, Whisper features, Qwen2-VL image and video processors,
    chat template). Works for the released checkpoints and for a folder written by ``processor.save_pretrained``
    (including a saved tiny processor)."""
    _require_qwen_omni()
    from transformers import Qwen2_5OmniProcessor
    return Qwen2_5OmniProcessor.from_pretrained(model_name_or_path, **kwargs)


# ----------------------------------------------------------------------------------------------------------- tiny
TINY_AUDIO = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                  max_source_positions=1500, n_window=50, output_dim=64)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=112, out_hidden_size=64, fullatt_block_indexes=[1])
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
TINY_VOCAB_SIZE = 1024  # BPE vocabulary target (special tokens included); the embedding rounds up to a multiple of 64


def _builtin_corpus():
    """Deterministic text the tiny tokenizer is trained on: the shipped prompts and the demo vocabulary."""
    from .demo_data import demo_vocabulary
    from .prompts import load_prompts

    prompts = load_prompts()
    texts = [prompts["system"], *prompts["intro"].values(), *prompts["tasks"].values()]
    texts += demo_vocabulary()
    texts += ["0 1 2 3 4 5 6 7 8 9 10 100 1000 Hz , . : ; ? ! ( ) [ ] - ' \" / yes no first second"]
    return texts


def _build_tiny_tokenizer(extra_texts=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(TINY_SPECIAL_TOKENS.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    corpus = [*_builtin_corpus(), *extra_texts]
    tok.train_from_iterator(corpus * 4, trainer)  # repeated so that every demo word becomes a token
    named = {k: v for k, v in TINY_SPECIAL_TOKENS.items() if k not in ("pad_token", "eos_token", "im_start",
                                                                        "vision_pad")}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_SPECIAL_TOKENS["eos_token"],
                                 pad_token=TINY_SPECIAL_TOKENS["pad_token"], extra_special_tokens=named,
                                 padding_side="left", model_max_length=32768)
    hf.chat_template = QWEN_OMNI_CHAT_TEMPLATE
    return hf


def build_tiny_processor(vocab_dir: Union[str, Path, None] = None, extra_texts=()):
    """A ``Qwen2_5OmniProcessor`` made locally (no hub) that matches ``build_tiny_thinker``.

    * tokenizer: byte-level BPE (any text encodes; no unknown tokens) trained offline on the shipped prompts and
      the demo vocabulary, with the Qwen2.5-Omni special tokens (``TINY_SPECIAL_TOKENS``) at fixed ids 0..10;
      the Qwen-style chat template ``QWEN_OMNI_CHAT_TEMPLATE``;
    * ``WhisperFeatureExtractor`` with 16 mel bins (= the tiny audio tower's ``num_mel_bins``), 16 kHz, hop 160;
    * Qwen2-VL image and video processors with patch 14, merge 2, temporal patch 2 (= the tiny vision tower).

    ``vocab_dir``: a folder written by ``processor.save_pretrained`` (e.g. saved next to a checkpoint): reloaded
    as is. ``extra_texts``: more training text for the BPE (changes the vocabulary: save the processor with the
    run). Building is deterministic: the same call gives the same ids in every process."""
    _require_qwen_omni()
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor

    if vocab_dir is not None:
        vocab_dir = Path(vocab_dir)
        if not (vocab_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"build_tiny_processor: {vocab_dir} holds no saved processor (tokenizer.json); "
                                    "write one with processor.save_pretrained(dir)")
        return Qwen2_5OmniProcessor.from_pretrained(str(vocab_dir))

    tokenizer = _build_tiny_tokenizer(extra_texts)
    feature_extractor = WhisperFeatureExtractor(feature_size=TINY_AUDIO["num_mel_bins"], sampling_rate=16000,
                                                hop_length=160, chunk_length=30, n_fft=400, return_attention_mask=True)
    vis = dict(patch_size=TINY_VISION["patch_size"], merge_size=TINY_VISION["spatial_merge_size"],
               temporal_patch_size=TINY_VISION["temporal_patch_size"])
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=224 * 224, **vis)
    video_processor = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=224 * 224, **vis)
    return Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=video_processor,
                                feature_extractor=feature_extractor, tokenizer=tokenizer,
                                chat_template=QWEN_OMNI_CHAT_TEMPLATE)


def tiny_thinker_config(processor=None):
    """The ``Qwen2_5OmniThinkerConfig`` of the tiny thinker; token ids taken from ``processor``'s tokenizer."""
    _require_qwen_omni()
    from transformers import Qwen2_5OmniThinkerConfig

    processor = build_tiny_processor() if processor is None else processor
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in TINY_SPECIAL_TOKENS.items()}
    vocab = -(-len(tok) // 64) * 64
    user_ids = tok.encode("user", add_special_tokens=False)
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(TINY_AUDIO), vision_config=dict(TINY_VISION),
        text_config=dict(TINY_TEXT, vocab_size=vocab, pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"]),
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"], user_token_id=user_ids[0],
        pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"],
    )


def build_tiny_thinker(seed: int = 0, processor=None) -> nn.Module:
    """A ``Qwen2_5OmniThinkerForConditionalGeneration`` at toy size with random weights (seeded; fp32; train
    mode): text 2 layers x 64 hidden, audio tower 2 layers x 32, vision tower 2 blocks x 32, ~0.3M parameters.
    Its token ids match ``build_tiny_processor()`` (pass the processor if you built it with ``extra_texts``)."""
    _require_qwen_omni()
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    config = tiny_thinker_config(processor)
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(cpu_state)
    model.config.use_cache = False
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.float().train()


# ----------------------------------------------------------------------------------------------------------- I-LoRA
def crab_ilora_targets(model: nn.Module):
    """Names of the ``nn.Linear`` modules the Crab+ recipe adapts (``CRAB_ILORA_TARGET_REGEX``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n
            and re.fullmatch(CRAB_ILORA_TARGET_REGEX, n)]


def expected_crab_ilora_count(config) -> int:
    """7 per LLM layer + 3 per audio-tower layer + 3 per vision block (388 for Qwen2.5-Omni-7B)."""
    cfg = getattr(config, "thinker_config", config)
    return (7 * cfg.text_config.num_hidden_layers + 3 * cfg.audio_config.encoder_layers
            + 3 * cfg.vision_config.depth)


def count_parameters(model: nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def apply_crab_ilora(model: nn.Module, r: int = 128, num_heads: int = 3, alpha: float = 256.0, dropout: float = 0.1,
                     gradient_checkpointing: bool = False, top_k: Optional[int] = None, backend: str = "auto",
                     verbose: bool = False) -> Dict[str, int]:
    """Freezes the thinker and swaps I-LoRA into the Crab+ target modules (in place, through
    ``ilora_kernels.apply_ilora`` with ``CRAB_ILORA_TARGET_REGEX``). Checks that the number of adapted modules is
    ``expected_crab_ilora_count(model.config)`` (388 at full size). ``gradient_checkpointing=True`` turns on
    non-reentrant gradient checkpointing (inputs made to require grad so checkpointed segments of a frozen base
    still back-propagate into the adapters). Returns ``{"modules", "total", "trainable", "frozen"}``."""
    from .. import ILoRAConfig, apply_ilora, ilora_layers

    cfg = ILoRAConfig(r=r, num_heads=num_heads, alpha=alpha, dropout=dropout, top_k=top_k, backend=backend,
                      target_modules=CRAB_ILORA_TARGET_REGEX)
    apply_ilora(model, cfg)
    n = len(ilora_layers(model))
    config = getattr(model, "config", None)
    if config is not None and hasattr(getattr(config, "thinker_config", config), "text_config"):
        want = expected_crab_ilora_count(config)
        if n != want:
            raise RuntimeError(f"apply_crab_ilora adapted {n} modules, expected {want} "
                               "(7 per LLM layer, q/k/v per audio layer, gate/up/down per vision block)")
    if gradient_checkpointing:
        ckpt_kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "config"):
            model.config.use_cache = False
    stats = {"modules": n, **count_parameters(model)}
    if verbose:
        print(f"I-LoRA: {n} modules, trainable {stats['trainable']:,} / total {stats['total']:,} parameters "
              f"({100.0 * stats['trainable'] / max(stats['total'], 1):.2f}%)")
    return stats
