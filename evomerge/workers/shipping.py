"""What the workers of a cluster need from the driver's disk besides the models: the Python
fitness module (its top-level package, or its single file) and the lm-eval task folder. They
travel with the actors as Ray's runtime_env `working_dir`, so a fitness next to the run config
reaches every node. Model weights never travel: each node reads its own copy or hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

TASKS = "evomerge_tasks"  # where the shipped task folder lands inside the working dir
# never worth sending: caches, weights, run folders
IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.safetensors", "*.bin", "*.pt", "*.gguf", ".git", "results"
)


def local_module(function: str, path: Optional[str]) -> Optional[Path]:
    """The file or package folder of `module:function`'s top-level module when it lives in the
    fitness's folder or the current one (not an installed package); None otherwise."""
    top = function.partition(":")[0].split(".")[0]
    for folder in [*([Path(path)] if path else []), Path.cwd()]:
        for candidate in (folder / top, folder / f"{top}.py"):
            if candidate.exists():
                return candidate.resolve()
    return None


def stage(fitness: dict[str, Any], root: Path) -> tuple[bool, dict[str, Any]]:
    """Copy what the workers need into `root`; return whether anything was staged and the
    fitness spec as a worker inside the shipped folder must read it."""
    spec = dict(fitness)
    if spec.get("kind") == "lm_eval":
        if not spec.get("include_path"):
            return False, spec
        folder = Path(spec["include_path"]).resolve()
        shutil.copytree(folder, root / TASKS / folder.name, ignore=IGNORE)
        spec["include_path"] = f"{TASKS}/{folder.name}"  # the worker's folder is the shipped one
        return True, spec
    module = local_module(spec["function"], spec.get("path"))
    if module is None:  # installed (or importable on the nodes some other way)
        return False, spec
    if module.is_dir():
        shutil.copytree(module, root / module.name, ignore=IGNORE)
    else:
        shutil.copy2(module, root / module.name)
    spec["path"] = None  # imported from the shipped folder, the worker's current one
    return True, spec
