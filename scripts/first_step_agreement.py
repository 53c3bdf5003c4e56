"""Do base and guidance agree where a chat answer starts? Before and after the shared boundary.

    python scripts/first_step_agreement.py --data ../shared/data/xstest_dev.csv --limit 60

Each prompt becomes one user message. At the first answer step, the script takes the guidance
model's top-1 string (its chat turn) and the base model's top-k strings (its transcript) and
counts the prompts where the first is among the second — the agreement BlendIn's α rewards
and string matching needs. Two settings side by side:

  before  the transcript as it was ("...\\nAssistant:") and exact string matching;
  after   the transcript as it is now (`shared.prompts.transcript`: turns a blank line apart,
          ending "Assistant:\\n")
          and matching by `junction.shared.steering.start_key` at the answer's first step.

The two mixed settings are printed too, so each half of the change can be seen on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from junction.offline.datasets import load_split  # noqa: E402
from junction.services.lm_runner import LMRunner  # noqa: E402
from junction.shared.config import ModelSpec  # noqa: E402
from junction.shared.models import load_model  # noqa: E402
from junction.shared.steering import start_key  # noqa: E402
from junction.shared.types import StepRequest  # noqa: E402


def old_transcript(messages: list[dict]) -> str:
    """The transcript before the change: one line per turn, ending at "Assistant:"."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def question_of(example) -> str:
    return example.meta.get("question") or example.prompt


def first_steps(runner: LMRunner, prompts: list[dict], k: int, batch: int = 16) -> list[list[str]]:
    """Top-k strings of the first answer step for each prompt, prefilled `batch` at a time."""
    texts = []
    for start in range(0, len(prompts), batch):
        ids = [f"{runner.role}{n}" for n in range(start, min(start + batch, len(prompts)))]
        for seq_id, prompt in zip(ids, prompts[start:], strict=False):
            runner.open(seq_id, **prompt)
        texts += [r.top.texts for r in runner.step([StepRequest(s, k=k) for s in ids])]
        for seq_id in ids:
            runner.close(seq_id)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", help="data file (repeatable)")
    parser.add_argument("--limit", type=int, default=60, help="prompts per file")
    parser.add_argument("--k", type=int, default=100, help="base top-k (BlendIn's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    files = args.data or ["../shared/data/xstest_dev.csv"]
    questions = [question_of(e) for f in files for e in load_split(f, "all", args.limit)]

    base = LMRunner(load_model("base", ModelSpec()), "base", chat=False)
    guidance = LMRunner(load_model("guidance", ModelSpec()), "guidance", chat=True)
    hits = {"before": 0, "transcript only": 0, "start_key only": 0, "after": 0}
    turns = {"before": 0, "after": 0}
    examples = []
    chats = [[{"role": "user", "content": q}] for q in questions]
    guide_tops = first_steps(guidance, [{"messages": m} for m in chats], 1)
    olds = first_steps(base, [{"prompt": old_transcript(m)} for m in chats], args.k)
    news = first_steps(base, [{"messages": m} for m in chats], args.k)
    for n, ([g_top1], old, new) in enumerate(zip(guide_tops, olds, news, strict=True)):
        hits["before"] += g_top1 in old
        hits["transcript only"] += g_top1 in new
        hits["start_key only"] += start_key(g_top1) in {start_key(t) for t in old}
        hits["after"] += start_key(g_top1) in {start_key(t) for t in new}
        # A base that opens the next turn ("User") would give an empty chat answer.
        turns["before"] += old[0].strip() == "User"
        turns["after"] += new[0].strip() == "User"
        if n < 5:
            examples.append({"guidance_top1": g_top1, "base_old_top3": old[:3],
                             "base_new_top3": new[:3]})
    total = len(questions)
    result = {
        "prompts": total,
        "k": args.k,
        "files": files,
        "share": {name: round(h / total, 3) for name, h in hits.items()},
        "hits": hits,
        "base_top1_opens_next_turn": turns,
        "examples": examples,
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"{total} chat prompts; guidance top-1 string in the base's top-{args.k}:")
    for name, h in hits.items():
        print(f"  {name:15s} {h:4d}/{total}  {h / total:.1%}")
    print(f"base top-1 opens a next turn (\"User\"): before {turns['before']}/{total}, "
          f"after {turns['after']}/{total}")
    for ex in examples:
        print(f"  e.g. guidance {ex['guidance_top1']!r}; base before {ex['base_old_top3']}, "
              f"after {ex['base_new_top3']}")


if __name__ == "__main__":
    main()
