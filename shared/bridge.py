"""The text bridge: each runner keeps its own token ids in step with the shared text.

Runners with different tokenizers exchange text, never ids. A `TokenText` detokenizes
incrementally over a short window (as text-generation-inference's `decode_token`) that starts
on a character boundary; bytes, not U+FFFD, tell an unfinished character. The tokenizer's
side (and candidate-text lookup) is `shared.vocab`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from junction.shared.types import EOS_TEXT, Commit
from junction.shared.vocab import Vocab, vocab_of

WINDOW = 5  # prompt tokens decoded as context for the first completion token


def _boundary_start(vocab: Vocab, ids: Sequence[int], end: int) -> int:
    """A window start a few tokens before `end` that is not inside a character."""
    start = max(0, end - WINDOW)
    while start < end and (data := vocab.bytes_of(ids[start])) and 0x80 <= data[0] < 0xC0:
        start += 1
    return start


class TokenText:
    """One runner's token sequence for one request, kept in step with the shared text."""

    def __init__(
        self, tokenizer, family: str, prompt_ids: list[int], eos_ids: Collection[int]
    ) -> None:
        self.vocab = vocab_of(tokenizer)
        self.family = family
        self.eos_ids = frozenset(eos_ids)
        self.ids: list[int] = list(prompt_ids)
        self.prompt_len = len(self.ids)
        self._start = _boundary_start(self.vocab, self.ids, self.prompt_len)
        self._prefix = self._start  # decode window: ids[_prefix:_read] is already text
        self._read = self.prompt_len
        self._pending = b""  # bytes of an unfinished UTF-8 character at the end
        self._prefix_text: str | None = None  # decode of ids[_prefix:_read], once needed
        eos_token = getattr(tokenizer, "eos_token_id", None)
        self._eos_id = eos_token if eos_token in self.eos_ids else min(self.eos_ids, default=None)

    @property
    def mid_char(self) -> bool:
        return bool(self._pending)

    def ids_for(self, commit: Commit) -> list[int]:
        """A commit in this runner's vocabulary (no change of state): its own ids when it
        comes from this runner's tokenizer family, else the encoding of its text."""
        if commit.family and commit.family == self.family:
            return list(commit.ids)
        if commit.text == EOS_TEXT:
            return [] if self._eos_id is None else [self._eos_id]
        return self.vocab.encode(commit.text)

    def apply(self, commit: Commit) -> list[int]:
        """Append a commit of the shared text; return the ids appended (see `ids_for`)."""
        new = self.ids_for(commit)
        self.ids += new
        self._advance([i for i in new if i not in self.eos_ids])
        return new

    def push(self, token_id: int) -> str:
        """Append one of this runner's own ids; return the text it completes."""
        self.ids.append(token_id)
        if token_id in self.eos_ids:
            return EOS_TEXT
        return self._advance([token_id])

    def candidate_texts(self, token_ids: Sequence[int]) -> list[str]:
        """The text each id would append if pushed now (no change of state)."""
        prefix_text = self._window_text()
        at_boundary = self._at_boundary(prefix_text)
        if at_boundary:
            table = self.vocab.texts_after_boundary(token_ids, self._byte_run())
            if None not in table and self.eos_ids.isdisjoint(token_ids):
                return table  # the usual step: every text from the table
        texts = [EOS_TEXT if i in self.eos_ids else "" for i in token_ids]
        todo = [n for n, i in enumerate(token_ids) if i not in self.eos_ids]
        if at_boundary:
            for n in todo:
                if (text := table[n]) is not None:
                    texts[n] = text
            todo = [n for n in todo if table[n] is None]
        whole = [n for n in todo if not self.vocab.pending_after(self._pending, [token_ids[n]])]
        if not whole:
            return texts
        window = self.ids[self._prefix :]
        decoded = self.vocab.decode_batch([[*window, token_ids[n]] for n in whole])
        for n, text in zip(whole, decoded, strict=True):
            texts[n] = text[len(prefix_text) :] if len(text) > len(prefix_text) else ""
        return texts

    def _window_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self.vocab.decode(self.ids[self._prefix : self._read])
        return self._prefix_text

    def _byte_run(self) -> bytes | None:
        """The bytes of the byte tokens that end the decode window (special tokens skipped);
        None when its last non-special token is no byte token."""
        vocab, run = self.vocab, []
        if vocab.byte_ids:
            for i in reversed(self.ids[self._prefix :]):
                if i in vocab.byte_ids:
                    run.append(vocab.bytes_of(i))
                elif i not in vocab.special:
                    break
        return b"".join(reversed(run)) if run else None

    def _at_boundary(self, prefix_text: str) -> bool:
        """Whether a candidate's text is its table text: the text ends on a character
        boundary, the window has text, and what follows it decodes to nothing."""
        return (
            not self._pending
            and bool(prefix_text)
            and all(i in self.vocab.special for i in self.ids[self._read :])
        )

    def completion_text(self) -> str:
        """Decode of the completion ids (in the context of the prompt's last tokens)."""
        head = self.vocab.decode(self.ids[self._start : self.prompt_len])
        return self.vocab.decode(self.ids[self._start :])[len(head) :]

    def _advance(self, new_ids: list[int]) -> str:
        """Account for ids just appended; return the text they complete."""
        self._pending = self.vocab.pending_after(self._pending, new_ids)
        if self._pending or not new_ids:
            return ""
        prefix_text = self._window_text()
        new_text = self.vocab.decode(self.ids[self._prefix :])
        if len(new_text) <= len(prefix_text):
            return ""  # only special tokens so far: keep the window
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = None
        return new_text[len(prefix_text) :]
