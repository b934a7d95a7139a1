"""Merge speed and memory: `evomerge merge` against `mergekit-yaml`, measured in the same run.

Builds three ~58M-parameter fp32 Llama models locally (hidden 512, 8 layers, vocab 32000),
runs the same ties / dare_ties / task_arithmetic configs through both CLIs, alternating, and
reports wall time, peak RSS, the ratio evomerge/mergekit and the memory-bandwidth floor (bytes
read + written over a measured copy bandwidth). Also times the in-memory path (recipe -> live
model) that search workers use, and where a command's fixed time goes: an interpreter that
imports torch and nothing else, and one that imports what `evomerge merge` imports; their
ratio to mergekit is the least any torch-based command can reach on this size.

    python benchmarks/merge_speed.py [--runs 3] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/family.py makes the models
CONFIGS = {
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {}},
}


def build_models(folder: Path) -> dict[str, Path]:
    from tests.family import make_family

    if (folder / "llama_ft1" / "config.json").exists():
        return {k: folder / f"llama_{k}" for k in ("base", "ft0", "ft1")}
    return make_family(
        folder,
        "llama",
        n_finetunes=2,
        seed=0,
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=8,
        intermediate=1376,
        vocab=32000,
    )


def recipe_for(name: str, models: dict[str, Path]) -> dict:
    spec = CONFIGS[name]
    params = dict(spec["parameters"])
    return {
        "merge_method": spec["merge_method"],
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft0"]), "parameters": {"weight": 0.6, **params}},
            {"model": str(models["ft1"]), "parameters": {"weight": 0.4, **params}},
        ],
        "dtype": "float32",
    }


# Runs a command and reports its wall time and peak RSS. A child's peak RSS counts from the
# RSS of the process that forked it, so the command is forked from this small launcher rather
# than from the benchmark (which holds torch and models).
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - start, "rss_kib": usage.ru_maxrss,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def timed_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"launcher failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    return result["wall"], result["rss_kib"] / 1024


def import_seconds(modules: str, runs: int) -> float:
    """Median wall time of a fresh interpreter that imports `modules` and exits."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second moved by a large in-memory copy (read + write counted)."""
    src = torch.ones(64 * 1024 * 1024, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def engine_seconds(recipe: dict, out: Path, runs: int) -> float:
    """`merge_to_disk` in this process: the merge itself, without interpreter start-up."""
    from evomerge.merge.engine import merge_to_disk
    from evomerge.recipe import Recipe

    times = []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        merge_to_disk(Recipe.from_dict(recipe), out, device="cpu", progress=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_memory_seconds(recipe: dict, runs: int) -> float:
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import load_source_tensors, merge_into_model, plan_for
    from evomerge.merge.io import ModelSource
    from evomerge.recipe import Recipe

    parsed = Recipe.from_dict(recipe)
    sources = {ref: ModelSource(ref) for ref in parsed.referenced_models()}
    tensors = load_source_tensors(sources, "cpu")
    live = AutoModelForCausalLM.from_pretrained(recipe["base_model"])
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        merge_into_model(plan_for(parsed, sources), tensors, live)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bin_dir = Path(sys.executable).parent
    mergekit_cli = shutil.which("mergekit-yaml", path=str(bin_dir)) or shutil.which("mergekit-yaml")
    if mergekit_cli is None:
        print("mergekit-yaml not found: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    evomerge_cli = str(bin_dir / "evomerge")
    work = args.out / "merge_speed"
    models = build_models(args.out / "models_58m")
    bandwidth = copy_bandwidth()
    torch_import = import_seconds("torch", args.runs)
    merge_imports = import_seconds("evomerge.cli, evomerge.merge.engine", args.runs)
    model_bytes = folder_bytes(models["base"])
    rows = []
    for name in CONFIGS:
        recipe = recipe_for(name, models)
        config_path = work / f"{name}.yml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(recipe))
        results: dict[str, list[tuple[float, float]]] = {"evomerge": [], "mergekit": []}
        for _ in range(args.runs):
            for tool in ("mergekit", "evomerge"):
                out = work / f"out_{tool}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = (
                    [
                        evomerge_cli,
                        "merge",
                        str(config_path),
                        str(out),
                        "--quiet",
                        "--device",
                        "cpu",
                    ]
                    if tool == "evomerge"
                    else [
                        mergekit_cli,
                        str(config_path),
                        str(out),
                        "--quiet",
                        "--no-copy-tokenizer",
                    ]
                )
                results[tool].append(timed_child(cmd))
        moved = 3 * model_bytes + folder_bytes(work / "out_evomerge")
        floor = moved / bandwidth
        engine = engine_seconds(recipe, work / "out_engine", args.runs)
        evo_t = statistics.median(r[0] for r in results["evomerge"])
        mk_t = statistics.median(r[0] for r in results["mergekit"])
        evo_rss = max(r[1] for r in results["evomerge"])
        mk_rss = max(r[1] for r in results["mergekit"])
        rows.append(
            {
                "method": name,
                "mergekit_s": mk_t,
                "evomerge_s": evo_t,
                "ratio": evo_t / mk_t,
                "mergekit_rss_mib": mk_rss,
                "evomerge_rss_mib": evo_rss,
                "engine_s": engine,
                "floor_s": floor,
                "engine_over_floor": engine / floor,
                "in_memory_s": in_memory_seconds(recipe, args.runs),
                "torch_import_s": torch_import,
                "merge_imports_s": merge_imports,
                "imports_over_mergekit": merge_imports / mk_t,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    table = [
        f"Three {model_bytes / 2**20:.0f} MiB fp32 Llama models (58M params), {args.runs} runs "
        f"each (median wall, max RSS), {machine}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"an interpreter importing torch alone: {torch_import:.2f} s, importing what `evomerge "
        f"merge` does: {merge_imports:.2f} s.",
        "",
        "| method | mergekit s | evomerge s | evomerge/mergekit | mergekit RSS MiB | "
        "evomerge RSS MiB | engine s | floor s | engine/floor | in-memory s | imports s | "
        "imports/mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['mergekit_s']:.2f} | {r['evomerge_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['mergekit_rss_mib']:.0f} | {r['evomerge_rss_mib']:.0f} | {r['engine_s']:.2f} | "
            f"{r['floor_s']:.3f} | {r['engine_over_floor']:.0f} | {r['in_memory_s']:.2f} | "
            f"{r['merge_imports_s']:.2f} | {r['imports_over_mergekit']:.2f} |"
        )
    text = "\n".join(table)
    print("\n" + text)
    (args.out / "merge_speed.md").write_text(text + "\n")
    (args.out / "merge_speed.json").write_text(
        json.dumps({"machine": machine, "bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
