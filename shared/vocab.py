"""One tokenizer as the text bridge sees it: its ids' bytes and texts, and text's encoding.

Built once per tokenizer (`vocab_of`) and shared by every sequence. Text stays exact: special
tokens are never text (EOS is `EOS_TEXT`; special-token strings in text encode as text),
pieces are encoded without SentencePiece's prepended "▁", and a literal "▁" is encoded as
byte tokens where the decoder would turn it into a space.

Candidate texts are the hot path: right after a character boundary most tokens add the same
text in any window, so each id is decoded once into a table (`texts_after_boundary`). The
byte tokens of byte-fallback decoders depend on the byte tokens before them (`_after_run`).
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from functools import cache
from operator import itemgetter

from tokenizers import Tokenizer

METASPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
ENCODED_TEXTS, ENCODED_TEXT = 4096, 64  # `Vocab.encode` keeps this many texts this short
UNKNOWN_RUN = b""  # `texts_after_boundary`: the byte tokens before are not known


def utf8_incomplete_tail(data: bytes) -> bytes:
    """The trailing bytes of `data` that start a UTF-8 character not yet finished."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data[-4:], final=False)
    return decoder.getstate()[0]


@cache
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(piece: str, *, byte_level: bool, byte_fallback: bool) -> bytes:
    """The bytes a vocabulary piece contributes to the decoded text (spaces aside)."""
    if byte_level:
        table = _gpt2_byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    elif byte_fallback and (match := _BYTE_TOKEN.fullmatch(piece)):
        return bytes([int(match[1], 16)])
    return piece.encode("utf-8")


def _decoder_types(config: dict | None) -> set[str]:
    if not config:
        return set()
    return {config["type"]} | {t for d in config.get("decoders", []) for t in _decoder_types(d)}


def without_prefix_space(config: dict | list) -> dict | list:
    """A normalizer/pre-tokenizer config that no longer prepends a space to the input."""
    if isinstance(config, list):
        return [without_prefix_space(c) for c in config]
    config = {
        k: without_prefix_space(v) if isinstance(v, dict | list) else v for k, v in config.items()
    }
    if config.get("type") == "Metaspace":
        config["prepend_scheme"] = "never"
        config.pop("add_prefix_space", None)
    elif config.get("type") == "ByteLevel":
        config["add_prefix_space"] = False
    elif config.get("type") == "Prepend":
        config["prepend"] = ""
    return config


class Vocab:
    """What the bridge needs to know about one tokenizer; built once and shared."""

    def __init__(self, tokenizer) -> None:
        self.backend: Tokenizer = tokenizer.backend_tokenizer
        decoder = self.backend.decoder
        types = _decoder_types(json.loads(decoder.__getstate__()) if decoder else None)
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        self.special = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str | None] = {}  # see `texts_after_boundary`
        self._byte_texts: dict[int, str | None] = {}  # the same for byte tokens, after a word
        byte_ids = {
            b: i for b in range(256)
            if self.byte_fallback and (i := self.backend.token_to_id(f"<0x{b:02X}>")) is not None
        }
        self.byte_ids = frozenset(byte_ids.values())
        self.ascii_byte_ids = frozenset(i for b, i in byte_ids.items() if b < 0x80)
        self._tails: dict[int, bytes] = {}  # unfinished-character bytes of each id alone
        self._encoded: dict[str, tuple[int, ...]] = {}  # short texts -> `encode(text)`
        self._encoder = self.backend
        if self._adds_prefix_space():
            config = json.loads(self.backend.to_str())
            for part in ("normalizer", "pre_tokenizer"):
                if config.get(part):
                    config[part] = without_prefix_space(config[part])
            self._encoder = Tokenizer.from_str(json.dumps(config))
        self._metaspace_bytes = self._escape_for_metaspace()
        self.missing_bytes = self._missing_bytes()
        self._anchor = self._plain_anchor()
        self._strips = "Strip" in types  # the decoder strips the text's start
        # Whole tables for the two contexts of nearly every step (no byte token before, an
        # invalid run); the rare valid run is patched in instead, to save a third copy.
        self._tables: dict[int | None, dict[int, str | None]] = {}
        self._after_valid: dict[int, dict[int, str | None]] = {}  # byte tokens after valid runs
        self._loose_bytes: frozenset[int] = frozenset()  # byte tokens that start no character
        if self.byte_ids:
            self._fill_byte_texts()
            if self._anchor is not None:
                self._tables = {key: {**self._texts, **self._after_run(key)} for key in (None, 0)}

    def _plain_anchor(self) -> list[int] | None:
        """Ids of "a": the context a table text is decoded after (None: no table)."""
        ids = self._encode_plain("a")
        plain = ids and self.decode(ids) == "a" and not self.byte_ids.intersection(ids)
        return ids if plain else None

    def _adds_prefix_space(self) -> bool:
        pieces = self.backend.encode("a", add_special_tokens=False).tokens
        return bool(pieces) and pieces[0][0] in (METASPACE, "Ġ")

    def _escape_for_metaspace(self) -> list[int] | None:
        """Byte-token ids that spell "▁" when the decoder would turn a "▁" into a space."""
        if self.decode(self._encode_plain(METASPACE)) == METASPACE:
            return None
        ids = [self.backend.token_to_id(f"<0x{b:02X}>") for b in METASPACE.encode()]
        return ids if self.byte_fallback and None not in ids else None

    def _missing_bytes(self) -> frozenset[int]:
        """Bytes a byte-level vocabulary has no token for (SmolLM2 lacks 21 of them)."""
        if not self.byte_level:
            return frozenset()
        return frozenset(
            b for c, b in _gpt2_byte_decoder().items() if self.backend.token_to_id(c) is None
        )

    def spell(self, text: str) -> str:
        """`text` as this vocabulary can spell it: a character with a byte it lacks becomes
        U+FFFD, or nothing when U+FFFD cannot be spelled either."""
        if not self.missing_bytes:
            return text
        replacement = "" if self._unspellable("\ufffd") else "\ufffd"
        return "".join(replacement if self._unspellable(c) else c for c in text)

    def _unspellable(self, char: str) -> bool:
        return not self.missing_bytes.isdisjoint(char.encode())

    def bytes_of(self, token_id: int) -> bytes:
        if (known := self._bytes.get(token_id)) is not None:
            return known
        piece = self.backend.id_to_token(token_id) or ""
        data = (
            b""
            if token_id in self.special
            else token_bytes(piece, byte_level=self.byte_level, byte_fallback=self.byte_fallback)
        )
        self._bytes[token_id] = data
        return data

    def pending_after(self, pending: bytes, ids: Iterable[int]) -> bytes:
        """The unfinished-character bytes after appending `ids` to text ending in `pending`."""
        ids = list(ids)
        if not pending and len(ids) == 1:  # a candidate after a boundary: once per id
            if (tail := self._tails.get(ids[0])) is None:
                tail = self._tails[ids[0]] = utf8_incomplete_tail(self.bytes_of(ids[0]))
            return tail
        return utf8_incomplete_tail(pending + b"".join(self.bytes_of(i) for i in ids))

    def texts_after_boundary(
        self, token_ids: Sequence[int], byte_run: bytes | None = UNKNOWN_RUN
    ) -> list[str | None]:
        """The text each id appends right after a character boundary, in a non-empty window:
        "" for an unfinished character or a special token, None where it depends on the
        neighbours. `byte_run`: the bytes of the byte tokens ending the window (None: none),
        which byte tokens' texts depend on; unknown (the default), byte tokens are None save
        those that start a character."""
        table, after = self._texts, None
        if self._tables and byte_run != UNKNOWN_RUN:
            key = self._run_key(byte_run)
            if key in self._tables:
                table = self._tables[key]
            elif (after := self._after_valid.get(key)) is None:  # a valid run: patched in
                after = self._after_valid[key] = self._after_run(key)
        try:  # every id in one C-level lookup
            texts = _lookup(table, token_ids)
        except KeyError:  # ids not seen before: their texts, once
            self._fill_texts([i for i in dict.fromkeys(token_ids) if i not in self._texts])
            texts = _lookup(table, token_ids)
        if after is None:
            return texts
        return [after.get(i, t) for i, t in zip(token_ids, texts, strict=True)]

    def _run_key(self, run: bytes | None) -> int | None:
        """What the byte tokens' texts depend on in a run: None (no run), 0 (an invalid run),
        else n + 1 - m for a valid run of n bytes decoded to m characters (see `_after_run`)."""
        if run is None:
            return None
        try:
            return len(run) + 1 - len(run.decode("utf-8"))
        except UnicodeDecodeError:
            return 0

    def _after_run(self, key: int | None) -> dict[int, str | None]:
        """The byte tokens' texts after a boundary, by `_run_key`. An invalid run renders as
        one U+FFFD per byte: after one (0), a byte that starts no character adds a U+FFFD.
        After a valid run of n bytes and m characters, an ASCII byte adds its character and
        any other invalidates the run, adding n + 1 - m U+FFFDs (None where the decoder
        strips the text's start). Bytes that start a character keep "" from `_texts`."""
        if key is None:
            return dict(self._byte_texts)
        if key == 0:
            return dict.fromkeys(self._loose_bytes, "\ufffd")
        other = None if self._strips else "\ufffd" * key
        ascii_texts = {i: self._byte_texts[i] for i in self.ascii_byte_ids}
        return {**dict.fromkeys(self._loose_bytes, other), **ascii_texts}

    def _fill_byte_texts(self) -> None:
        """Every byte token's texts (at most 256, so all at once)."""
        byte_ids = sorted(self.byte_ids)
        self._fill_texts(byte_ids)
        self._loose_bytes = frozenset(i for i in byte_ids if not self.pending_after(b"", [i]))

    def _fill_texts(self, token_ids: list[int]) -> None:
        anchor, byte_ids = self._anchor, [i for i in token_ids if i in self.byte_ids]
        if anchor is None:  # no table: every candidate is decoded in its window
            self._texts.update(dict.fromkeys(token_ids))
            self._byte_texts.update(dict.fromkeys(byte_ids))
            return
        # A token that leaves a character unfinished adds "" in any context; a byte token
        # after a word is a run of its own (U+FFFD when it is no character alone).
        starts = {i for i in token_ids if self.pending_after(b"", [i])}
        texts: dict[int, str | None] = {i: "" if i in starts else None for i in token_ids}
        self._byte_texts.update((i, "") for i in byte_ids if i in starts)
        plain = [i for i in token_ids if i not in starts and self._context_free(i)]
        loose = [i for i in byte_ids if i not in starts]
        for table, ids in ((texts, plain), (self._byte_texts, loose)):
            for i, text in zip(ids, self.decode_batch([[*anchor, i] for i in ids]), strict=True):
                table[i] = text[1:] if len(text) > 1 else ""
        self._texts.update(texts)
        for table in self._tables.values():  # the same in every context: no byte token comes
            table.update(texts)  # here after `_fill_byte_texts`, which runs before any table

    def _context_free(self, token_id: int) -> bool:
        """Whether the token's text after a boundary is the same in any window: its bytes
        are whole characters and it is no byte-fallback byte token (an invalid run turns them
        all into U+FFFDs). A byte-level decoder never reaches back past a boundary, so all
        its tokens qualify."""
        if token_id in self.byte_ids:
            return False
        return self.byte_level or valid_utf8(self.bytes_of(token_id))

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        # One by one: `Tokenizer.decode_batch`'s thread pool costs more than it saves here
        # (docs/benchmarks-history.md, "Per-token overhead").
        return [self.backend.decode(ids, skip_special_tokens=True) for ids in batch]

    def _encode_plain(self, text: str) -> list[int]:
        # Special-token strings inside text are text: encode them as such.
        saved = self._encoder.encode_special_tokens
        self._encoder.encode_special_tokens = True
        try:
            return self._encoder.encode(text, add_special_tokens=False).ids
        finally:
            self._encoder.encode_special_tokens = saved

    def encode(self, text: str) -> list[int]:
        """Ids that decode to exactly `spell(text)` when appended after a character boundary.
        Short texts recur at junctions, so they are kept (a bounded table)."""
        if (known := self._encoded.get(text)) is not None:
            return list(known)
        ids = self._encode_text(text)
        if len(text) <= ENCODED_TEXT:
            if len(self._encoded) >= ENCODED_TEXTS:
                self._encoded.clear()
            self._encoded[text] = tuple(ids)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        text = self.spell(text)
        if self._metaspace_bytes is None or METASPACE not in text:
            return self._encode_plain(text)
        parts = text.split(METASPACE)
        ids = self._encode_plain(parts[0]) if parts[0] else []
        for part in parts[1:]:
            ids += self._metaspace_bytes + (self._encode_plain(part) if part else [])
        return ids


def _lookup(table: dict[int, str | None], ids: Sequence[int]) -> list[str | None]:
    """`[table[i] for i in ids]` in C (`itemgetter` returns the item itself for one id)."""
    if len(ids) < 2:
        return [table[i] for i in ids]
    return list(itemgetter(*ids)(table))


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_vocabs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_of(tokenizer) -> Vocab:
    """The shared `Vocab` of a tokenizer (built on first use)."""
    if (vocab := _vocabs.get(tokenizer)) is None:
        vocab = _vocabs[tokenizer] = Vocab(tokenizer)
    return vocab
