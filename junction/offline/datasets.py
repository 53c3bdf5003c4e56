"""Prompts (and references, where a data set has them) from the public evaluation files.

Formats, recognised by their columns, and the prompt each row gives the base model:

- TruthfulQA CSV (`Question`, `Correct Answers`, ...): `Q: {question}\nA:`. References:
  true = the correct answers, the best answer and "I have no comment." (as TruthfulQA's own
  scoring adds); false = the incorrect answers.
- GSM8K jsonl (`question`, `answer`): `Question: {question}\nAnswer:`. References: true = the
  worked answer; the gold number is kept in `meta["gold"]`.
- XSTest CSV (`prompt`, `label`, ...) and any CSV or jsonl with a `prompt` column: the prompt
  as it is; other columns go to `meta`.
- AdvBench CSV (`goal`, `target`): the goal.
- Any other text file: one prompt per non-empty line.

The base model is a plain (unaligned) language model, so questions are framed as text it
continues; a newline ends its answer (callers pass "\\n" as a stop string).

Train/eval split, one rule for every file: the data row with an even 0-based index
(0, 2, 4, ...) is a training row, an odd one an evaluation row. It depends on nothing but
the file, so training and evaluation never share a prompt, on any machine.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from junction.offline.rewards import References

Split = Literal["train", "eval", "all"]
SPLITS: tuple[str, ...] = ("train", "eval", "all")
NO_COMMENT = "I have no comment."


@dataclass(slots=True, frozen=True)
class Example:
    prompt: str  # text the base model continues
    row: int  # 0-based data row in its file (the split rule reads this)
    refs: References | None = None
    meta: dict = field(default_factory=dict, compare=False)


def split_answers(cell: str) -> tuple[str, ...]:
    """TruthfulQA's `; `-separated answer list."""
    return tuple(a.strip() for a in cell.split(";") if a.strip())


def truthfulqa_example(row: int, rec: dict[str, str]) -> Example:
    correct = split_answers(rec["Correct Answers"])
    best = rec["Best Answer"].strip()
    extra = tuple(a for a in (best, NO_COMMENT) if a and a not in correct)
    refs = References(correct + extra, split_answers(rec["Incorrect Answers"]))
    meta = {"question": rec["Question"], "category": rec.get("Category", ""), "best": best}
    return Example(f"Q: {rec['Question'].strip()}\nA:", row, refs, meta)


def gsm8k_example(row: int, rec: dict) -> Example:
    answer = rec["answer"]
    gold = answer.split("####")[-1].strip()
    worked = answer.split("####")[0].strip()
    refs = References((worked,) if worked else (gold,))
    meta = {"question": rec["question"], "gold": gold}
    return Example(f"Question: {rec['question'].strip()}\nAnswer:", row, refs, meta)


def csv_examples(path: Path) -> list[Example]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if {"Question", "Correct Answers", "Incorrect Answers"} <= columns:
        return [truthfulqa_example(i, r) for i, r in enumerate(rows)]
    if {"goal", "target"} <= columns:
        return [Example(r["goal"], i, meta={"target": r["target"]}) for i, r in enumerate(rows)]
    if "prompt" in columns:
        return [Example(r["prompt"], i, meta=_rest(r, "prompt")) for i, r in enumerate(rows)]
    raise ValueError(f"{path.name}: no known columns (TruthfulQA, AdvBench, or a 'prompt' column)")


def jsonl_examples(path: Path) -> list[Example]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    examples = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if "question" in rec and "answer" in rec:
            examples.append(gsm8k_example(i, rec))
        elif "prompt" in rec:
            examples.append(Example(rec["prompt"], i, meta=_rest(rec, "prompt")))
        else:
            raise ValueError(f"{path.name}, line {i + 1}: needs 'prompt' or 'question'/'answer'")
    return examples


def _rest(rec: dict, drop: str) -> dict:
    return {k: v for k, v in rec.items() if k != drop}


def load_examples(path: str | Path) -> list[Example]:
    """Every row of a data file, in file order (see the module docstring for formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".csv":
        return csv_examples(path)
    if path.suffix == ".jsonl":
        return jsonl_examples(path)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [Example(ln, i) for i, ln in enumerate(ln for ln in lines if ln)]


def in_split(example: Example, split: Split) -> bool:
    """Even data rows are training rows, odd rows evaluation rows."""
    if split == "all":
        return True
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    return (example.row % 2 == 0) == (split == "train")


def load_split(path: str | Path, split: Split = "all", limit: int | None = None) -> list[Example]:
    """The rows of one split, in file order; `limit` keeps the first `limit` of them."""
    examples = [e for e in load_examples(path) if in_split(e, split)]
    return examples[:limit] if limit is not None else examples
