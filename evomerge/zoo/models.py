"""The zoo's model shapes and tokenizer, made locally: a byte-level tokenizer (token id ==
byte value, as the zoo's training loop feeds it) and small Llama/Mistral/Qwen2 configs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ARCHITECTURES = ("llama", "mistral", "qwen2")


def _byte_chars() -> dict[int, str]:
    """The byte-level pre-tokenizer's printable stand-in for each byte (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(vocab_extra: int = 0):
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) built without any download."""
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: byte for byte, ch in _byte_chars().items()}  # token id == byte value
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    for i in range(vocab_extra):
        vocab[f"<extra_{i}>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_config(
    arch: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: Optional[int] = None,
    vocab: int = 272,
    tie: bool = False,
    **extra,
):
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}")
    return AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate or hidden * 2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        **extra,
    )


def save_model(
    model: torch.nn.Module, folder: Path, tokenizer=None, shard_size: Optional[str] = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
