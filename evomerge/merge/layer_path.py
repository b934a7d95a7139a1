"""Data-flow merges: a path of decoder layers drawn from several models, exported exactly as an
ordinary checkpoint of the same architecture.

In a pre-norm residual block every sublayer reads the stream through a scale-invariant norm and
adds its output back, so scaling the stream by s where the path enters layer p equals scaling
the embeddings and every residual-writing projection before p by s. Folding the product of the
scales that follow each point gives a plain model whose logits equal the scaled path's (only the
norms' epsilon differs). The plan is a list of passthrough ops with those factors as `scale`, so
the streaming and in-memory engines run it unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.io import ModelSource
from evomerge.merge.methods import get_method
from evomerge.merge.ops import POST_NAME, MergePlan, TensorOp, split_layer_name
from evomerge.recipe import Recipe

# Architectures whose blocks are pre-norm residual (x + f(norm(x))) and the tensors that write
# into the residual stream. The one place that says which architectures data-flow merging folds.
FOLDABLE_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    arch: (
        "self_attn.o_proj.weight",
        "self_attn.o_proj.bias",
        "mlp.down_proj.weight",
        "mlp.down_proj.bias",
    )
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
}


def build_dataflow_plan(
    recipe: Recipe,
    names: dict[str, str],
    sources: dict[str, ModelSource],
    out_dtype: Optional[torch.dtype] = None,
) -> MergePlan:
    """Lay out the folded checkpoint of a data-flow recipe; `names` maps the recipe's model names
    to keys of `sources`."""
    assert recipe.path
    embed_name = recipe.embed_from or recipe.path[0].model
    embed_ref = names[embed_name]
    embed = sources[embed_ref]
    arch = embed.architecture
    residual = FOLDABLE_ARCHITECTURES.get(arch)
    if residual is None:
        raise EvomergeError(
            f"data-flow merging cannot fold scales exactly for {arch}; supported: "
            f"{', '.join(sorted(FOLDABLE_ARCHITECTURES))}"
        )
    for name, ref in names.items():
        other = sources[ref]
        if other.architecture != arch:
            raise EvomergeError(
                f"models.{name}: architecture {other.architecture} differs "
                f"from {arch} of '{embed_name}'"
            )
        for key in ("hidden_size", "vocab_size"):
            if other.config.get(key) != embed.config.get(key):
                raise EvomergeError(
                    f"models.{name}: {key} {other.config.get(key)} differs from "
                    f"{embed.config.get(key)} of '{embed_name}'"
                )
    for i, step in enumerate(recipe.path):
        depth = sources[names[step.model]].num_layers
        if step.layer >= depth:
            raise EvomergeError(
                f"path.{i}: layer {step.layer} is out of range for "
                f"'{step.model}', which has {depth} layers"
            )

    # following[p] = product of the scales of path positions p..end
    following = [1.0] * (len(recipe.path) + 1)
    for p in range(len(recipe.path) - 1, -1, -1):
        following[p] = following[p + 1] * recipe.path[p].scale

    ops: list[TensorOp] = []

    def add(out_name: str, ref: str, tensor: str, factor: Optional[float]) -> None:
        info = sources[ref].index[tensor]
        copy_only = not info.dtype.is_floating_point
        scale = None if factor is None or factor == 1.0 else factor
        dtype = info.dtype if copy_only or out_dtype is None else out_dtype
        ops.append(
            TensorOp(
                out_name,
                [(ref, tensor)],
                None,
                {},
                [] if copy_only else [{"scale": scale}],
                dtype,
                info.shape,
                copy_only,
            )
        )

    outer = [n for n in embed.index if split_layer_name(n) is None]
    pre = [n for n in outer if not POST_NAME.search(n)]
    post = [n for n in outer if POST_NAME.search(n)]
    for name in pre:
        add(name, embed_ref, name, following[0])
    layer_sources = []
    for p, step in enumerate(recipe.path):
        ref = names[step.model]
        found = False
        for name in sources[ref].index:
            parts = split_layer_name(name)
            if parts is None or parts[1] != step.layer:
                continue
            found = True
            prefix, _, rest = parts
            add(f"{prefix}{p}.{rest}", ref, name, following[p + 1] if rest in residual else None)
        if not found:
            raise EvomergeError(
                f"path.{p}: model '{step.model}' has no tensors for layer {step.layer}"
            )
        layer_sources.append((ref, step.layer))
    for name in post:
        add(name, embed_ref, name, None)
    overrides = {}
    embed_tensor = next((n for n in pre if n.endswith("embed_tokens.weight")), None)
    if "lm_head.weight" not in embed.index and embed_tensor is not None:
        add("lm_head.weight", embed_ref, embed_tensor, None)  # untie: the head keeps raw embeddings
        overrides["tie_word_embeddings"] = False
    tokenizer = recipe.tokenizer_source
    tokenizer_ref = (
        names.get(tokenizer, tokenizer) if tokenizer not in (None, "base") else embed_ref
    )
    if tokenizer_ref not in sources:
        raise EvomergeError(f"field 'tokenizer_source': {tokenizer!r} is not a key of 'models'")
    return MergePlan(
        recipe,
        get_method("passthrough"),
        ops,
        embed_ref,
        tokenizer_ref,
        layer_sources,
        sources,
        overrides,
    )
