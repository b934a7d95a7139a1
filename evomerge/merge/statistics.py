"""Statistics of each source model on calibration text, for the data-aware merges (Fisher,
RegMean): computed once per source, stored as safetensors in a statistics folder (a run keeps
its own under the run folder, so a resume or an export reuses them), read tensor by tensor.

Per source, one file `<sha of the model reference>.safetensors` holds
  fisher:<parameter>   diagonal Fisher: the mean over calibration texts of the squared gradient
                       of the text's mean token log-likelihood
  gram:<weight>        X^T X / tokens for the input X of every torch.nn.Linear (d_in x d_in)
and its metadata names the model and the calibration text's hash, so statistics of other text
are never read by mistake.

Gram matrices are accumulated in float64 on the host, one linear layer at a time as its input
passes, so device memory holds none of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save

from evomerge.errors import EvomergeError

KINDS = ("fisher", "gram")
CALIBRATION = "calibration.json"  # RegMean++'s texts, kept in the statistics folder


def calibration_hash(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def stats_file(folder: Path, model_ref: str) -> Path:
    return Path(folder) / f"{hashlib.sha256(model_ref.encode()).hexdigest()[:16]}.safetensors"


def read_calibration(path: Path, limit: Optional[int] = None) -> list[str]:
    """Texts from a JSONL file (a "text" field, or "prompt" plus an optional "target") or a
    plain text file (one text per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"--calibration {path}: no such file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                raise EvomergeError(f"{path}:{number}: not a JSON object") from None
            text = doc.get("text") if isinstance(doc, dict) else None
            if text is None and isinstance(doc, dict) and "prompt" in doc:
                text = str(doc["prompt"]) + str(doc.get("target", ""))
            if not isinstance(text, str):
                raise EvomergeError(
                    f"{path}:{number}: give each line a 'text' (or 'prompt' and 'target') field"
                )
            texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise EvomergeError(f"{path}: the calibration file holds no text")
    return texts[:limit] if limit else texts


def linear_inputs(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Weight name -> the linear layer it belongs to: what RegMean's Gram matrices are of."""
    found = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    if not found:
        raise EvomergeError(
            f"{type(model).__name__}: its linear layers cannot be hooked (no torch.nn.Linear "
            "modules); RegMean needs them: use fisher or pcb for this architecture"
        )
    return found


def compute(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    kinds: Iterable[str] = KINDS,
    max_length: int = 256,
) -> dict[str, torch.Tensor]:
    """fisher:* and gram:* statistics of `model` on `texts` (see the module's docstring)."""
    kinds = set(kinds)
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    if "gram" in kinds:
        for name, module in linear_inputs(model).items():

            def hook(module, args, name=name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                product = (x.T @ x).to("cpu", torch.float64)
                if name in grams:
                    grams[name].add_(product)
                else:
                    grams[name] = product

            hooks.append(module.register_forward_pre_hook(hook))
    params = {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_("fisher" in kinds)
    tokens = count = 0
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            input_ids = ids["input_ids"].to(device)
            if input_ids.shape[1] < 2:
                continue
            with torch.set_grad_enabled("fisher" in kinds):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            tokens += input_ids.numel()
            count += 1
            if "fisher" in kinds:
                model.zero_grad(set_to_none=True)
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n].add_(p.grad.to(torch.float32).square())
    finally:
        for hook in hooks:
            hook.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    if count == 0:
        raise EvomergeError("calibration: no text has two or more tokens")
    out = {}
    if "fisher" in kinds:
        out.update({f"fisher:{n}": f.div_(count) for n, f in fisher.items()})
    out.update({f"gram:{n}": g.div_(tokens).to(torch.float32) for n, g in grams.items()})
    return share_equal(out)


def share_equal(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gram matrices of linears fed the same input (q/k/v, gate/up) are equal bit for bit: one
    tensor object serves them all, so a file stores it once (a 7B model's 28 GB become 22)."""
    first: dict[tuple, list[str]] = {}
    for key, value in stats.items():
        if not key.startswith("gram:"):
            continue
        diagonal = hashlib.blake2b(value.diagonal().contiguous().numpy().tobytes()).digest()
        for owner in first.setdefault((tuple(value.shape), diagonal), []):
            if torch.equal(stats[owner], value):
                stats[key] = stats[owner]
                break
        else:
            first[(tuple(value.shape), diagonal)].append(key)
    return stats


def split_shared(stats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store, and the keys that read another key's tensor."""
    owner: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, value in stats.items():
        if id(value) in owner:
            aliases[key] = owner[id(value)]
        else:
            owner[id(value)] = key
    kept = {k: v.contiguous() for k, v in stats.items() if k not in aliases}
    return kept, aliases


def stored(folder: Path, model_ref: str, texts: list[str]) -> Optional[Path]:
    """The source's statistics file when the folder holds one for this very text."""
    path = stats_file(folder, model_ref)
    if path.exists() and read_metadata(path).get("calibration") == calibration_hash(texts):
        return path
    return None


def measure_source(
    model_ref: str,
    texts: list[str],
    device: torch.device,
    kinds: Iterable[str] = KINDS,
    max_length: int = 256,
    trust_remote_code: bool = False,
    model_path: Optional[str] = None,
) -> bytes:
    """A source's statistics as the bytes of their safetensors file (what a worker sends back
    to the driver, which keeps the run folder); `model_path`: where this machine finds the
    model when the reference is relative or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = model_path or model_ref
    model = AutoModelForCausalLM.from_pretrained(
        load, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(load, trust_remote_code=trust_remote_code)
    stats = compute(model.eval(), tokenizer, texts, kinds, max_length)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    kept, aliases = split_shared(stats)
    metadata = {
        "model": model_ref,
        "calibration": calibration_hash(texts),
        "texts": str(len(texts)),
        "aliases": json.dumps(aliases),  # key -> the stored key holding its (equal) tensor
    }
    return save(kept, metadata=metadata)


def write_statistics(folder: Path, model_ref: str, data: bytes) -> Path:
    """Store a source's statistics file (a kill mid-write leaves no half file under its name)."""
    path = stats_file(folder, model_ref)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def compute_for_source(
    model_ref: str,
    texts: list[str],
    folder: Path,
    device: torch.device,
    kinds: Iterable[str] = KINDS,
    max_length: int = 256,
    trust_remote_code: bool = False,
    model_path: Optional[str] = None,
) -> Path:
    """Compute and store a source's statistics here (unless stored already for the same
    text)."""
    found = stored(folder, model_ref, texts)
    if found is not None:
        return found
    data = measure_source(
        model_ref, texts, device, kinds, max_length, trust_remote_code, model_path
    )
    return write_statistics(Path(folder), model_ref, data)


def save_texts(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CALIBRATION
    path.write_text(json.dumps(texts))
    return path


def read_texts(folder: Path) -> list[str]:
    path = Path(folder) / CALIBRATION
    if not path.exists():
        raise EvomergeError(
            f"field 'statistics': {folder} has no calibration text for regmean_plus; compute "
            "the statistics with --calibration FILE"
        )
    return json.loads(path.read_text())


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


class Statistics:
    """Reads the statistics a recipe names, tensor by tensor (files opened lazily, once)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EvomergeError(
                f"field 'statistics': {folder} is not a folder; compute the statistics with "
                "`evomerge merge RECIPE OUT --calibration FILE`"
            )
        self.handles: dict[str, Any] = {}
        self.names: dict[str, set[str]] = {}  # per model, the keys its file holds
        self.aliases: dict[str, dict[str, str]] = {}  # per model, key -> key stored for it

    def _handle(self, model_ref: str) -> Any:
        if model_ref not in self.handles:
            path = stats_file(self.folder, model_ref)
            if not path.exists():
                raise EvomergeError(
                    f"field 'statistics': {self.folder} has no statistics for model "
                    f"{model_ref}; compute them with --calibration FILE"
                )
            handle = safe_open(str(path), framework="pt")
            self.handles[model_ref] = handle
            self.aliases[model_ref] = json.loads((handle.metadata() or {}).get("aliases", "{}"))
            self.names[model_ref] = set(handle.keys()) | set(self.aliases[model_ref])
        return self.handles[model_ref]

    def get(self, model_ref: str, kind: str, name: str) -> Optional[torch.Tensor]:
        handle = self._handle(model_ref)
        key = f"{kind}:{name}"
        if key not in self.names[model_ref]:
            return None
        return handle.get_tensor(self.aliases[model_ref].get(key, key))

    def check(self, model_refs: Iterable[str], kind: str) -> None:
        """Fail now, naming the model, when a source's statistics are missing or lack `kind`
        (RegMean++ reads the calibration text itself: it measures the merged model)."""
        if kind == "activations":
            read_texts(self.folder)
            return
        for ref in model_refs:
            self._handle(ref)
            if not any(key.startswith(f"{kind}:") for key in self.names[ref]):
                raise EvomergeError(
                    f"field 'statistics': the statistics of {ref} hold no {kind} values; "
                    "compute them again with --calibration FILE"
                )
