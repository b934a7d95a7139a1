"""Is bfloat16 scoring faster than float32 on this CPU? A matrix product of SmolLM2-135M's MLP
shapes (a batch of 256 tokens x 576 by 576 x 1536), one thread, both dtypes, median of runs.
CPUs without bf16 instructions (AVX-512 BF16, AMX) emulate it.

    python benchmarks/bf16_matmul.py [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def milliseconds(dtype: torch.dtype, repeats: int = 50) -> float:
    x, w = torch.randn(256, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    x @ w.T  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w.T
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "float32_ms": milliseconds(torch.float32),
        "bfloat16_ms": milliseconds(torch.bfloat16),
    }
    result["bf16_over_fp32"] = round(result["bfloat16_ms"] / result["float32_ms"], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_matmul.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
