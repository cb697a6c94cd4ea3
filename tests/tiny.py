"""Tiny in-process models for fast tests: random weights, a real BPE tokenizer."""

from __future__ import annotations

import functools

import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. Where there is a will there is a way. "
    "Litwo, ojczyzno moja! Ty jesteś jak zdrowie. Ile cię trzeba cenić, ten tylko się dowie. "
    "Numbers 0123456789 and symbols (a+b)*c = d; e-mail: x@y.z\n\n"
)


@functools.cache
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str = "llama", **overrides):
    from transformers import AutoConfig

    base = dict(
        vocab_size=len(make_tokenizer()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    if arch.startswith("gemma3"):
        base.update(
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        )
        arch = "gemma3_text"
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def make_tiny_model(arch: str = "llama", seed: int = 0, add_bos: bool = False, **overrides):
    """A LoadedModel with random weights (scaled so that logits are not degenerate)."""
    from transformers import AutoModelForCausalLM

    from q2lab.models.arch import prepare_model
    from q2lab.models.loader import LoadedModel, ModelInfo

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = prepare_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)).eval()
    tok = make_tokenizer()
    info = ModelInfo(
        name=f"tiny-{arch}",
        kind="test",
        path="",
        fingerprint=f"tiny-{arch}-{seed}-{sorted(overrides.items())}",
        model_type=cfg.model_type,
        add_bos=add_bos,
        bos_token_id=tok.bos_token_id,
        n_params=sum(p.numel() for p in model.parameters()),
        dtype="float32",
    )
    return LoadedModel(model, tok, info)


def checkpoint_logits(lm, report, path):
    """Logits of ``lm`` on fixed random ids before saving it as a q2lab checkpoint at ``path``
    and after loading it back: a lossless checkpoint gives two identical tensors."""
    from q2lab.export.checkpoint import save_checkpoint
    from q2lab.models import load_model

    x = torch.randint(0, len(lm.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.model(x).logits
    save_checkpoint(lm, path, report.to_dict())
    with torch.no_grad():
        after = load_model(str(path)).model(x).logits
    return before, after
