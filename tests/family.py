"""A local model family (a base and dense random 'fine-tunes') for tests, benchmarks and the
README's merge example, where no model hub can be reached.

    python -m tests.family --out results/example
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from evomerge.zoo.models import ARCHITECTURES, byte_tokenizer, save_model, tiny_config


def make_family(
    root: Path,
    arch: str = "llama",
    *,
    n_finetunes: int = 2,
    seed: int = 0,
    shard_size: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    finetune_scale: float = 0.02,
    **config_kwargs,
) -> dict[str, Path]:
    """A base model and `n_finetunes` 'fine-tunes' (base + dense random task vectors) on disk."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    tokenizer = byte_tokenizer()
    base = AutoModelForCausalLM.from_config(config).to(dtype)
    paths = {"base": save_model(base, root / f"{arch}_base", tokenizer, shard_size)}
    generator = torch.Generator().manual_seed(seed + 1)
    for i in range(n_finetunes):
        tuned = AutoModelForCausalLM.from_config(config).to(dtype)
        with torch.no_grad():
            for p, q in zip(tuned.parameters(), base.parameters()):
                noise = torch.randn(q.shape, generator=generator) * finetune_scale
                p.copy_(q + noise.to(dtype))
        paths[f"ft{i}"] = save_model(tuned, root / f"{arch}_ft{i}", tokenizer, shard_size)
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m tests.family --out DIR`: write a local base + fine-tunes family."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--finetunes", type=int, default=2)
    args = parser.parse_args(argv)
    if (args.out / f"{args.arch}_base" / "config.json").exists():
        print(f"model family already in {args.out}")
        return 0
    paths = make_family(
        args.out,
        args.arch,
        n_finetunes=args.finetunes,
        hidden=args.hidden,
        layers=args.layers,
        heads=max(1, args.hidden // 64),
        kv_heads=max(1, args.hidden // 128),
    )
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
