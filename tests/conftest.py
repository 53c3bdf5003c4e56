"""Shared fixtures: tiny models built in the test session, and the real embedded defaults."""

from __future__ import annotations

import pytest

from tests.tiny import TinyPair, tiny_pair


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests in files named test_integration*.py use the real models: mark them."""
    for item in items:
        if item.path.name.startswith("test_integration"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    """Llama over a byte-level BPE tokenizer with a chat template (SmolLM2-like)."""
    return tiny_pair("llama", "bytelevel", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    """Gemma 3 (sliding window 8) over a Gemma-style byte-fallback tokenizer that adds <bos>."""
    return tiny_pair("gemma3", "sentencepiece", tmp_path_factory.mktemp("tiny_gemma"))


@pytest.fixture(scope="session")
def embedded_base():
    """The real default base model (Gemma 3 270M), through the one loader."""
    from junction.shared.config import ModelSpec
    from junction.shared.models import load_model

    return load_model("base", ModelSpec())


@pytest.fixture(scope="session")
def embedded_guidance():
    """The real default guidance model (SmolLM2-135M-Instruct), through the one loader."""
    from junction.shared.config import ModelSpec
    from junction.shared.models import load_model

    return load_model("guidance", ModelSpec())
