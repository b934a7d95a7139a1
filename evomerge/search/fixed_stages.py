"""Models of a run that are merges themselves: a `models:` entry naming a recipe file (one
merge config, or a mergekit-multi multi-stage file) is that file's output, merged once and
searched over like any checkpoint, so a search can tune a multi-stage merge's final stage
with the earlier stages fixed.

The merge is kept beside the file, under `.evomerge/`, named by a hash of the stages and of
the paths of the models they read: it is made once (atomically, as every merge), reused by
later runs of the same stages, and made again when the file changes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

from evomerge.merge.engine import merge_to_disk
from evomerge.merge.stages import Stages

log = logging.getLogger("evomerge")
RECIPE_SUFFIXES = (".yaml", ".yml")
FOLDER = ".evomerge"


def is_recipe_file(ref: str) -> bool:
    path = Path(ref)
    return path.suffix in RECIPE_SUFFIXES and path.is_file()


def merged_model(ref: str, device: str = "auto", allow_pickle: bool = False) -> Optional[str]:
    """The folder holding recipe file `ref`'s merge (made now if it is not made yet), or None
    when `ref` is not a recipe file."""
    if not is_recipe_file(ref):
        return None
    path = Path(ref).resolve()
    stages = Stages.from_yaml(path)
    reads = [_where(r, path.parent) for r in stages.referenced_models()]
    key = hashlib.sha256("\n".join([stages.to_yaml(), *reads]).encode()).hexdigest()[:12]
    out = path.parent / FOLDER / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        log.info("model %s: its merge is made already (%s)", ref, out)
        return str(out)
    log.info("model %s: merging it once into %s", ref, out)
    merge_to_disk(
        stages.final if stages.single else stages,
        out,
        device=device,
        allow_pickle=allow_pickle,
        recipe_dir=path.parent,
    )
    return str(out)


def _where(ref: str, recipe_dir: Path) -> str:
    """A model reference as the merge resolves it (a folder beside the recipe, or as given)."""
    local = recipe_dir / ref
    return str(local.resolve()) if not Path(ref).is_absolute() and local.exists() else ref
