"""Tiny tokenizers and models built inside the tests, in well under a second each.

Three tokenizer kinds cover the tokenizer designs the text bridge must handle:

- "bytelevel": GPT-2 style byte-level BPE (like SmolLM2). Adds no BOS; has a ChatML-like
  chat template; EOS is `<|im_end|>`.
- "sentencepiece": Gemma-style Metaspace BPE with byte fallback: spaces become "▁", nothing
  is prepended, characters outside the vocabulary travel as `<0xNN>` byte tokens. The
  tokenizer adds `<bos>`.
- "metaspace": Llama/Mistral-style SentencePiece: like "sentencepiece", but "▁" is prepended
  to the first word and the decoder strips one leading space again.

Models are random-init `LlamaForCausalLM` / `Gemma3ForCausalLM` with a few thousand
parameters; the Gemma 3 one mixes sliding-window (window 8) and full-attention layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

TOKENIZER_KINDS = ("bytelevel", "sentencepiece", "metaspace")
MODEL_KINDS = ("llama", "gemma3")
SLIDING_WINDOW = 8

CORPUS = """\
The ocean covers most of the surface of the earth, and it holds most of its water.
Whales, dolphins and sharks swim in the deep sea; small fish live near the coral reefs.
A good answer is short, clear and kind. Please explain why the sky is blue.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Language models predict the next token from the text that came before it.
When the model is unsure, a second model can help it choose the next word.
User: What is the capital of France?
Assistant: The capital of France is Paris.
Numbers like 1, 2, 3, 42 and 1000 appear in text, and so do dates such as 2024-05-01.
Café, naïve, über, 東京, Ελλάδα and emoji 🙂 show up in real text too.
def add(a, b):
    return a + b
It was the best of times, it was the worst of times, it was the age of wisdom.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BYTELEVEL_SPECIALS = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<pad>"}
SENTENCEPIECE_SPECIALS = {"unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}


def _corpus_lines() -> list[str]:
    return CORPUS.splitlines(keepends=True)


@cache
def _bytelevel_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[*BYTELEVEL_SPECIALS.values(), "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok.to_str()


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


@cache
def _sentencepiece_json(prepend_first: bool) -> str:
    """Train a Metaspace BPE, then rebuild it with `<0xNN>` byte tokens and byte fallback."""
    scheme = "first" if prepend_first else "never"
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False)
    draft.train_from_iterator(_corpus_lines(), trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    specials = list(SENTENCEPIECE_SPECIALS.values())
    pieces = specials + _byte_tokens()
    pieces += [p for p in sorted(trained["vocab"], key=trained["vocab"].get) if p not in pieces]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_first:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    bos = SENTENCEPIECE_SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return tok.to_str()


def tiny_tokenizer(kind: str = "bytelevel") -> PreTrainedTokenizerFast:
    """A fresh tokenizer of the given kind (see the module docstring)."""
    if kind == "bytelevel":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_bytelevel_json()),
            bos_token=BYTELEVEL_SPECIALS["bos"],
            eos_token=BYTELEVEL_SPECIALS["eos"],
            pad_token=BYTELEVEL_SPECIALS["pad"],
            additional_special_tokens=["<|im_start|>"],
        )
        tok.chat_template = CHAT_TEMPLATE
        return tok
    if kind in ("sentencepiece", "metaspace"):
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_sentencepiece_json(kind == "metaspace")),
            unk_token=SENTENCEPIECE_SPECIALS["unk"],
            bos_token=SENTENCEPIECE_SPECIALS["bos"],
            eos_token=SENTENCEPIECE_SPECIALS["eos"],
            pad_token=SENTENCEPIECE_SPECIALS["pad"],
        )
    raise ValueError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}")


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_config(vocab_size: int, ids: dict[str, int]) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **ids,
    )


def _gemma3_config(vocab_size: int, ids: dict[str, int]) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=512,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **ids,
    )


def tiny_model(
    kind: str = "llama", tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0
) -> PreTrainedModel:
    """A random-init tiny causal LM over `tokenizer`'s vocabulary, float32, in eval mode."""
    tokenizer = tokenizer or tiny_tokenizer("sentencepiece" if kind == "gemma3" else "bytelevel")
    ids = _special_ids(tokenizer)
    if kind == "llama":
        config, cls = _llama_config(len(tokenizer), ids), LlamaForCausalLM
    elif kind == "gemma3":
        config, cls = _gemma3_config(len(tokenizer), ids), Gemma3ForCausalLM
    else:
        raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}")
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(**ids)
    model.requires_grad_(False)
    return model


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, dir: Path) -> Path:
    """Save model, tokenizer and generation config so a loader can take `dir` as a path."""
    dir = Path(dir)
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


@dataclass(slots=True)
class TinyPair:
    """A tiny model with its tokenizer, also saved under `path` for loaders that take a path."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    path: Path


def tiny_pair(model_kind: str, tokenizer_kind: str, dir: Path, seed: int = 0) -> TinyPair:
    tokenizer = tiny_tokenizer(tokenizer_kind)
    model = tiny_model(model_kind, tokenizer, seed=seed)
    return TinyPair(model, tokenizer, save_tiny(model, tokenizer, dir))
