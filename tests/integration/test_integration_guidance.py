"""The guidance pair on the embedded defaults: where the answer starts, and where it ends."""

from __future__ import annotations

import asyncio

import pytest

from junction.gateway.engine import Engine
from junction.gateway.sequence import GenerationRequest
from junction.services.handles import LocalHandle
from junction.services.lm_runner import LMRunner
from junction.shared.config import PolicyConfig, SamplingParams
from junction.shared.prompts import base_prompt_text
from junction.shared.steering import start_key
from junction.shared.types import StepRequest

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER_PROMPT = "Question: What is the capital of France?\nAnswer:"  # ends in a colon
ONE_WORD = [{"role": "user", "content": "Say only the word: yes"}]


@pytest.fixture(scope="module")
def runners(embedded_base, embedded_guidance):
    return {
        "base": LMRunner(embedded_base, "base", chat=False),
        "guidance": LMRunner(embedded_guidance, "guidance", chat=True),
    }


def generate(runners, policy: str, max_tokens: int, prompt=None, messages=None, **options):
    async def main():
        engine = Engine({role: LocalHandle(r) for role, r in runners.items()})
        await engine.start()
        try:
            req = GenerationRequest(
                prompt=prompt,
                messages=messages,
                sampling=SamplingParams(max_tokens=max_tokens),
                policy=PolicyConfig(policy=policy, **options),
            )
            return await engine.generate(req)
        finally:
            await engine.close()

    return asyncio.run(main())


def test_both_models_start_a_chat_answer_with_the_same_string(runners):
    """The transcript and the chat turn meet at a line break: the guidance's first word is
    among the base's candidates, spelled the same."""
    runners["base"].open("b", messages=CHAT)
    runners["guidance"].open("g", messages=CHAT)
    try:
        base = runners["base"].step([StepRequest("b", k=100)])[0].top.texts
        guide = runners["guidance"].step([StepRequest("g", k=1)])[0].top.texts[0]
    finally:
        runners["base"].close("b")
        runners["guidance"].close("g")
    assert guide in base, (guide, base[:10])
    assert start_key(guide) == guide  # no leading space to tell the two spellings apart


@pytest.mark.parametrize("policy", ["blendin", "nudging"])
@pytest.mark.parametrize("source", [{"messages": CHAT}, {"prompt": ANSWER_PROMPT}])
def test_no_answer_glues_a_word_to_the_prompt(runners, policy, source):
    # τ = 1: the guidance model acts at the very first step, where gluing would happen.
    result = generate(runners, policy, 8, tau=1.0, **source)
    prompt = base_prompt_text(**source)
    assert result.text, result
    # "Answer:The capital" was the defect: after a prompt that does not end in whitespace,
    # the answer must not start with a letter or digit.
    assert prompt[-1].isspace() or not result.text[0].isalnum(), prompt + result.text


def test_nudging_ends_where_the_guidance_model_ends_after_a_word(runners):
    """ "Say only the word: yes": the guidance model writes one word, then its end of text,
    and the answer ends there instead of the base writing on."""
    alone = generate(runners, "guidance", 16, messages=ONE_WORD)
    assert alone.finish_reason == "stop" and len(alone.text.split()) == 1, alone.text
    nudged = generate(runners, "nudging", 16, messages=ONE_WORD, tau=1.0)
    assert nudged.finish_reason == "stop"
    assert nudged.text == alone.text
    # One step: the word and its end of text. Dropping the end, the answer went on to a
    # second step, where only another junction (or luck) could end it; a confident base
    # kept writing.
    assert nudged.steps == 1 and nudged.by_kind["guidance"] == 1
