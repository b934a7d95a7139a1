"""Merges whose coefficients were trained by gradient descent: DAM and AdaMerging. The training
lives in evomerge/learn/; here is the pure math that turns stored coefficients into a tensor,
and the file the coefficients are stored in.

DAM (Gauthier-Caron et al., arXiv:2410.08371, "Merging in a Bottle"): every source i has a
coefficient vector c_i over the last dimension of each tensor it scales (a linear layer's input
columns); the merged tensor is sum_i s_i * c_i * W_i (columns scaled, full weights, not task
vectors; s_i the per-input `scale`, 1 for the learned merge itself). A tensor the file holds no
coefficients for is the base model's when the recipe names one, else the inputs' mean.

AdaMerging (Yang et al., arXiv:2310.02575): theta = theta_0 + sum_k s_k * lambda_k * tau_k with
one lambda per source per layer (or per tensor), in [0, 1]; a tensor with no lambda is the
base's.

The coefficient file (safetensors, named by the recipe's `coefficients`, relative paths read
beside the recipe):
  tensors   "<i>:<tensor name>"   float32, i the position of the model in `models`; DAM: a
                                   vector as long as the tensor's last dimension; AdaMerging: a
                                   scalar (shape [])
  metadata  format  "evomerge-coefficients/1"
            method  "dam" | "adamerging"
            models  JSON list of the merged (non-base) model references, recipe order
            base    the base model's reference, or ""
            trained JSON: what the training saw (steps, lr, texts, tokens, losses, seconds)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.errors import EvomergeError
from evomerge.merge.methods import MergeInputs, Method, Param, _finite, register

if TYPE_CHECKING:
    from evomerge.recipe import Recipe

FORMAT = "evomerge-coefficients/1"
LEARNED = ("dam", "adamerging")
# where a merged model's folder keeps the file (and its training log): in a folder of its own,
# so that loaders reading every *.safetensors of a checkpoint never take it for weights
COEFFICIENTS = "learned/coefficients.safetensors"
LOG = "learn_log.jsonl"  # one JSON line per training step, beside the coefficients


def coefficient_key(index: int, name: str) -> str:
    return f"{index}:{name}"


def write_coefficients(
    path: Path,
    method: str,
    models: list[str],
    base: Optional[str],
    coefficients: dict[str, list[torch.Tensor]],
    trained: Optional[dict[str, Any]] = None,
) -> Path:
    """Store per tensor name the coefficients of each model (in `models` order); a kill
    mid-write leaves no half file under the name."""
    tensors = {
        coefficient_key(i, name): value.detach().to("cpu", torch.float32).contiguous()
        for name, values in coefficients.items()
        for i, value in enumerate(values)
    }
    metadata = {
        "format": FORMAT,
        "method": method,
        "models": json.dumps(models),
        "base": base or "",
        "trained": json.dumps(trained or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)
    return path


class Coefficients:
    """A coefficient file read tensor by tensor; `get` has the shape of Statistics.get, so the
    engine hands either to a method the same way."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EvomergeError(
                f"field 'coefficients': {self.path} is not a file; train one with "
                "`evomerge learn CONFIG --method dam|adamerging --out DIR`"
            )
        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
            raise EvomergeError(
                f"field 'coefficients': {self.path} is not a safetensors file ({exc})"
            ) from None
        meta = self.handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise EvomergeError(
                f"field 'coefficients': {self.path} is not an evomerge coefficient file "
                f"(format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        self.method = meta["method"]
        self.models: list[str] = json.loads(meta["models"])
        self.base = meta.get("base") or None
        self.trained: dict[str, Any] = json.loads(meta.get("trained") or "{}")
        self.keys = set(self.handle.keys())
        self.folder = self.path.parent

    def get(self, model_ref: str, kind: str, name: str) -> Optional[torch.Tensor]:
        key = coefficient_key(self.models.index(model_ref), name)
        return self.handle.get_tensor(key) if key in self.keys else None

    def names(self) -> set[str]:
        return {key.partition(":")[2] for key in self.keys}

    def check(self, model_refs: Iterable[str], kind: str, base: Optional[str] = None) -> None:
        """Fail now when the file was learned by another method, for other models or over
        another base."""
        if self.method != kind:
            raise EvomergeError(
                f"field 'coefficients': {self.path} holds {self.method} coefficients; the "
                f"recipe's merge_method is {kind}"
            )
        given = list(model_refs)
        if given != self.models:
            raise EvomergeError(
                f"field 'coefficients': {self.path} was learned for the models {self.models}; "
                f"the recipe merges {given} (same models, same order)"
            )
        if (base or None) != self.base and (kind == "adamerging" or self.base is not None):
            raise EvomergeError(
                f"field 'coefficients': {self.path} was learned over the base {self.base!r}; "
                f"the recipe's base_model is {base!r}"
            )


def as_stored(recipe: Recipe) -> Recipe:
    """The recipe as a merged model's folder stores it: a learned one names the copy of its
    coefficient file in the folder."""
    if recipe.merge_method in LEARNED and recipe.coefficients:
        return recipe.model_copy(update={"coefficients": COEFFICIENTS})
    return recipe


def learned_method(recipe: Optional[str]) -> Optional[str]:
    """ "dam" or "adamerging" for a learned merge's recipe (YAML), else None (data-flow recipes
    included)."""
    data = yaml.safe_load(recipe) if recipe else None
    if isinstance(data, dict) and data.get("merge_method") in LEARNED:
        return data["merge_method"]
    return None


def learned_summary(recipe: Optional[str]) -> Optional[dict[str, Any]]:
    """For a learned merge's recipe (YAML), its method and how its coefficients were trained
    (read from the file's metadata); None for any other recipe."""
    if not recipe:
        return None
    data = yaml.safe_load(recipe)
    if not isinstance(data, dict) or data.get("merge_method") not in LEARNED:
        return None
    out: dict[str, Any] = {"method": data["merge_method"]}
    path = Path(data.get("coefficients") or "")
    if path.is_file():
        trained = Coefficients(path).trained
        keys = ("steps", "seconds", "tokens_forward", "tokens_backward", "loss_last")
        out.update({k: trained[k] for k in keys if k in trained})
    return out


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t in tensors:
        out.add_(t)
    return out.div_(len(tensors))


def _need(m: MergeInputs, method: str) -> list:
    if m.stats is None:
        raise EvomergeError(
            f"field 'coefficients': {method} merges with learned coefficients; name their file "
            "or train one with `evomerge learn CONFIG --method dam|adamerging --out DIR`"
        )
    return m.stats


def dam(m: MergeInputs) -> torch.Tensor:
    columns = _need(m, "dam")
    if any(c is None for c in columns):
        return m.base.clone() if m.base is not None else _mean(m.others)
    out = torch.zeros_like(m.others[0])
    for w, c, p in zip(m.others, columns, m.per_input):
        scale = c if p["scale"] == 1.0 else c * p["scale"]
        out.addcmul_(w, scale.expand_as(w))
    return out


def adamerging(m: MergeInputs) -> torch.Tensor:
    lambdas = _need(m, "adamerging")
    out = m.base.clone()
    for w, lam, p in zip(m.others, lambdas, m.per_input):
        if lam is None:
            continue
        factor = float(lam.clamp(0.0, 1.0)) * p["scale"]
        out.add_(w - m.base, alpha=factor)
    return out


SCALE = Param("scale", float, "input", 1.0, _finite)  # 1: the learned merge; a search tunes it
register(
    Method(
        "dam",
        dam,
        (SCALE,),
        base="optional",
        min_non_base=1,
        reference="arXiv:2410.08371",
        learned="dam",
    )
)
register(
    Method(
        "adamerging",
        adamerging,
        (SCALE,),
        base="required",
        min_non_base=1,
        reference="arXiv:2310.02575",
        learned="adamerging",
        entrywise=lambda shared: True,
        task_vector=True,
    )
)
