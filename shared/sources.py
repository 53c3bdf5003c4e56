"""Model sources checked before anything loads: a typo fails fast, in one line.

Otherwise a bad path or id meets transformers' download retries and a long traceback. No
torch or transformers imports, so the command line can check before it imports them.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"  # shipped with the package
DEFAULT_VALUE_DIR = DEFAULTS_DIR / "value"
# A Hugging Face model id: "name" or "owner/name" (letters, digits, - _ .).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SOURCE_HINT = (
    "a model source is 'default', a local directory in transformers format, a .gguf file, or "
    "a Hugging Face id (offline: one already in the local cache)"
)


class ModelSourceError(FileNotFoundError):
    """A model source that names nothing loadable; found before any slow download or load."""

    hint = SOURCE_HINT


def _hub_is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_source(role: str, source: str) -> str:
    """`source` if it can be loaded, else a ModelSourceError in one line, fast.

    A path must exist; a Hugging Face id must be in the local cache or, when the Hub is
    allowed, known to the Hub (one short request).
    """
    path = Path(source).expanduser()
    if source == "default":
        return source
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelSourceError(f"{role} model: {source} has no config.json (a model directory "
                               "in transformers format has one)")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelSourceError(f"{role} model: {source} is a file but not a .gguf file")
    if path.exists():
        return source
    looks_like_path = source.startswith(("/", ".", "~")) or source.endswith(".gguf")
    if looks_like_path or not HUB_ID.fullmatch(source):
        raise ModelSourceError(f"{role} model: no such file or directory: {source}")
    if _in_hub_cache(source):
        return source
    if _hub_is_offline():
        raise ModelSourceError(
            f"{role} model {source!r}: not a local path and not in the local Hugging Face "
            "cache (HF_HUB_OFFLINE is set)"
        )
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(source, timeout=10)
    except GatedRepoError as exc:
        raise ModelSourceError(
            f"{role} model {source!r} is gated on the Hugging Face Hub: accept its terms and "
            "set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"{role} model {source!r}: not a local path and no such model on the Hugging Face "
            "Hub (or it is private: set HF_TOKEN)"
        ) from exc
    except Exception as exc:  # connection refused, DNS, timeout, proxy: the Hub is unreachable
        raise ModelSourceError(
            f"{role} model {source!r}: not a local path, not in the local Hugging Face cache, "
            f"and the Hub cannot be reached ({type(exc).__name__})"
        ) from exc
    return source


def check_adapter(adapter_dir: Path) -> Path:
    """`adapter_dir` if it holds a value model's adapter, else FileNotFoundError."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(_missing_adapter_message(adapter_dir))
    return adapter_dir


def _missing_adapter_message(adapter_dir: Path) -> str:
    return (
        f"SIA needs a value model, and there is none at {adapter_dir}. Train one with "
        "`junction train-value` (it writes a directory with a LoRA adapter and a value head) "
        "and pass that directory as the value model, or use a policy that needs no value "
        "model (base, blendin, nudging, guidance)."
    )
