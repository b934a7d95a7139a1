"""The dimensions of a model that its scoring memory depends on, read from its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """The model dimensions scoring's memory depends on (from config.json)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int
    context: int

    @property
    def activation_width(self) -> int:
        """Elements per token of one layer's live activations (the MLP's three, four of H)."""
        return 3 * self.intermediate + 4 * self.hidden

    @property
    def cache_width(self) -> int:
        """Elements per token of the key/value cache over every layer."""
        return 2 * self.layers * self.kv_width

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        cfg = config.get("text_config", config)
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        return cls(
            vocab=int(cfg.get("vocab_size") or 0),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
            layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
            kv_width=int(cfg.get("num_key_value_heads") or heads) * head_dim,
            context=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048),
        )
