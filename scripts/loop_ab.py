"""The in-process decode loop of two commits, side by side: ms per tick on the tiny pair.

    python scripts/loop_ab.py 119985d HEAD --pairs 4 --reps 3

Each commit is checked out in a temporary worktree and measured in processes of its own,
alternating (A, B, A, B, ...), so a load that comes and goes on a shared machine falls on
both. A process builds the tests' tiny base and guidance (`tests/tiny.py`), warms up, then
times `base` and `blendin` at 16 streams and 1 stream, `--reps` times each, and prints the
median ms per tick; this script prints each side's median over the pairs and B ÷ A per pair
(median and range). It uses the commit's own `scripts/benchmark.py` helpers, so it measures
any commit that has them, before or after the import root moved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = (("base", 16), ("blendin", 16), ("base", 1), ("blendin", 1))

# Runs inside the measured commit's worktree (its path is argv[1]).
MEASURE = """
import asyncio, json, statistics, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # as the served workers of the tiny pair get
import scripts.benchmark as b
reps, sides = int(sys.argv[2]), json.loads(sys.argv[3])
base_path, guidance_path = b.tiny_models(Path(tempfile.mkdtemp()))
def runner(role, path, chat):
    return b.LocalHandle(b.LMRunner(b.load_model(role, b.tiny_spec(path), progress=False),
                                    role, chat=chat))
runners = {"base": runner("base", base_path, False),
           "guidance": runner("guidance", guidance_path, True)}
async def one(policy, streams):
    engine = b.Engine(runners, b.Limits(max_concurrency=64))
    await engine.start()
    try:
        return await b.engine_ms_per_tick(engine, streams, 64, policy)
    finally:
        await engine.close()
for side in sides:
    asyncio.run(one(*side))  # warm-up
times = {f"{p}/{n}": [asyncio.run(one(p, n)) for _ in range(reps)] for p, n in sides}
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def worktree(rev: str, into: Path) -> Path:
    path = into / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev],
                   check=True)
    return path


def measure(tree: Path, reps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tree), str(reps), json.dumps(SIDES)],
        cwd=tree, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="commit A (e.g. the one before a change)")
    parser.add_argument("b", help="commit B")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="junction-ab-") as tmp:
        trees = {rev: worktree(rev, Path(tmp)) for rev in (args.a, args.b)}
        try:
            runs: dict[str, list[dict]] = {args.a: [], args.b: []}
            for pair in range(args.pairs):
                for rev in (args.a, args.b) if pair % 2 == 0 else (args.b, args.a):
                    runs[rev].append(measure(trees[rev], args.reps))
                    print(f"pair {pair + 1}: {rev} {runs[rev][-1]}", file=sys.stderr)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)
    print(f"{'ms per tick':14s} {args.a:>10s} {args.b:>10s}   B ÷ A per pair: median [range]")
    for side in runs[args.a][0]:
        a = [r[side] for r in runs[args.a]]
        b = [r[side] for r in runs[args.b]]
        ratios = sorted(y / x for x, y in zip(a, b, strict=True))
        print(f"{side:14s} {statistics.median(a):10.2f} {statistics.median(b):10.2f}   "
              f"{statistics.median(ratios):.2f} [{ratios[0]:.2f} – {ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
