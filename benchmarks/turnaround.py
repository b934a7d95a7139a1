"""Candidate turnaround on a ~100M-parameter model: the worker's in-place materialization
against mergekit's in-memory path (mergekit-evolve --in-memory: its planner and executor
writing into a live model), against writing the merge to disk and loading it back
(mergekit-evolve's default path), and each as a fraction of one lm-eval evaluation.

    python benchmarks/turnaround.py [--repeats 3] [--docs 200] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_task(folder: Path, docs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    from evomerge.zoo.build import TASK_YAML

    (folder / "bench_mc.yaml").write_text(TASK_YAML.format(name="bench_mc"))
    with open(folder / "bench_mc.jsonl", "w") as f:
        for n in range(docs):
            doc = {
                "prompt": f"What is {n} plus {n % 7}?",
                "choices": [f" {n + n % 7}", f" {n + n % 7 + 1}", f" {n - 1}"],
                "answer": 0,
            }
            f.write(json.dumps(doc) + "\n")
    return folder


class MergekitInMemory:
    """mergekit-evolve's `--in-memory` path without its lm-eval part: plan the merge with
    mergekit's planner and executor and copy each tensor into one live model it keeps."""

    def __init__(self, mergekit_yaml: str) -> None:
        import yaml
        from mergekit.architecture import arch_info_for_config
        from mergekit.config import MergeConfiguration
        from mergekit.merge import _model_out_config
        from mergekit.options import MergeOptions
        from transformers import AutoModelForCausalLM

        self.config = MergeConfiguration.model_validate(yaml.safe_load(mergekit_yaml))
        self.info = arch_info_for_config(self.config.base_model.config())
        self.out_config = _model_out_config(self.config, self.info)
        self.options = MergeOptions(device="cpu", allow_crimes=True)
        self.model = AutoModelForCausalLM.from_config(self.out_config).eval()
        self.params = dict(self.model.named_parameters())

    def materialize(self) -> None:
        from mergekit.graph import Executor
        from mergekit.io.tasks import ReturnTensor
        from mergekit.plan import MergePlanner

        planner = MergePlanner(self.config, self.info, self.options, self.out_config)
        # plan_in_memory() itself, less the pydantic validation of ReturnTensor that fails on
        # mergekit 0.1.5 with current pydantic ("Can't instantiate abstract class Task")
        planner._plan()
        tasks = [
            ReturnTensor.model_construct(
                weight_info=w, tensor_task=t, dtype=w.force_dtype or self.config.out_dtype
            )
            for w, t in planner._tensors
        ]
        executor = Executor(tasks, math_device="cpu", storage_device="cpu")
        with torch.no_grad():
            for task, value in executor.run(quiet=True):
                self.params[task.weight_info.name].data.copy_(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.engine import merge_to_disk
    from evomerge.recipe import Recipe
    from evomerge.workers.evaluator import Evaluator
    from tests.family import make_family

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = make_family(
            tmp / "models",
            "llama",
            n_finetunes=2,
            seed=0,
            hidden=768,
            layers=10,
            heads=12,
            kv_heads=4,
            intermediate=2048,
            vocab=16000,
        )
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(models["base"]).parameters()
        )
        tasks = write_task(tmp / "tasks", args.docs)
        recipe = Recipe.from_dict(
            {
                "merge_method": "dare_ties",
                "base_model": str(models["base"]),
                "seed": 1,
                "models": [
                    {"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.6}}
                    for k in ("ft0", "ft1")
                ],
            }
        )
        fitness = {
            "kind": "lm_eval",
            "tasks": ["bench_mc"],
            "include_path": str(tasks),
            "batch_size": 16,
        }
        worker = Evaluator([str(models[k]) for k in ("base", "ft0", "ft1")], fitness, device="cpu")
        in_place, disk, evaluation, mergekit, mergekit_memory = [], [], [], [], []
        mergekit_cli = Path(sys.executable).with_name("mergekit-yaml")
        (tmp / "mergekit.yml").write_text(recipe.to_mergekit_yaml())
        peer = MergekitInMemory(recipe.to_mergekit_yaml()) if mergekit_cli.exists() else None
        for _ in range(args.repeats):
            if peer is not None:  # its live model built once, like the worker's
                start = time.perf_counter()
                peer.materialize()
                mergekit_memory.append(time.perf_counter() - start)
            start = time.perf_counter()
            model, tokenizer = worker.materialize(recipe)
            in_place.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                worker.fitness(model, tokenizer)
            evaluation.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = merge_to_disk(recipe, tmp / "merged", force=True, progress=False, device="cpu")
            AutoModelForCausalLM.from_pretrained(out)
            AutoTokenizer.from_pretrained(out)
            disk.append(time.perf_counter() - start)
            if mergekit_cli.exists():  # mergekit-evolve's path: mergekit writes, HF reloads
                start = time.perf_counter()
                subprocess.run(
                    [
                        str(mergekit_cli),
                        str(tmp / "mergekit.yml"),
                        str(tmp / "mk"),
                        "--copy-tokenizer",
                        "--allow-crimes",
                    ],
                    check=True,
                    capture_output=True,
                )
                AutoModelForCausalLM.from_pretrained(tmp / "mk")
                mergekit.append(time.perf_counter() - start)
                shutil.rmtree(tmp / "mk")
    row = {
        k: statistics.median(v)
        for k, v in (("in_place_s", in_place), ("disk_s", disk), ("evaluation_s", evaluation))
    }
    if mergekit_memory:
        row["mergekit_in_memory_s"] = statistics.median(mergekit_memory)
        row["mergekit_in_memory_speedup"] = row["mergekit_in_memory_s"] / row["in_place_s"]
        row["mergekit_in_memory_fraction"] = row["mergekit_in_memory_s"] / row["evaluation_s"]
    if mergekit:
        row["mergekit_disk_s"] = statistics.median(mergekit)
        row["mergekit_speedup"] = row["mergekit_disk_s"] / row["in_place_s"]
        row["mergekit_fraction"] = row["mergekit_disk_s"] / row["evaluation_s"]
    row.update(
        params=params,
        docs=args.docs,
        repeats=args.repeats,
        speedup=row["disk_s"] / row["in_place_s"],
        in_place_fraction=row["in_place_s"] / row["evaluation_s"],
        disk_fraction=row["disk_s"] / row["evaluation_s"],
    )
    lines = [
        f"Candidate turnaround: {params / 1e6:.0f}M-parameter fp32 Llama, dare_ties of two "
        f"fine-tunes, lm-eval on {args.docs} 3-way multiple-choice documents, "
        f"{platform.processor() or 'cpu'}, median of {args.repeats}",
        "",
        "| path | seconds | vs in-place | fraction of one evaluation |",
        "|---|---|---|---|",
        f"| in place (worker) | {row['in_place_s']:.2f} | 1.0x | {row['in_place_fraction']:.1%} |",
        f"| evomerge merge to disk + reload | {row['disk_s']:.2f} | {row['speedup']:.1f}x | "
        f"{row['disk_fraction']:.1%} |",
    ]
    if mergekit_memory:
        lines.append(
            f"| mergekit planner + executor into a live model (mergekit-evolve --in-memory) "
            f"| {row['mergekit_in_memory_s']:.2f} | {row['mergekit_in_memory_speedup']:.1f}x "
            f"| {row['mergekit_in_memory_fraction']:.1%} |"
        )
    if mergekit:
        lines.append(
            f"| mergekit-yaml + reload (mergekit-evolve) | {row['mergekit_disk_s']:.2f} "
            f"| {row['mergekit_speedup']:.1f}x | {row['mergekit_fraction']:.1%} |"
        )
    lines.append(f"| one evaluation | {row['evaluation_s']:.2f} | | |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "turnaround.md").write_text("\n".join(lines) + "\n")
    (args.out / "turnaround.json").write_text(json.dumps(row, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
