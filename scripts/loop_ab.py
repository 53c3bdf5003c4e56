"""The in-process decode loop of two commits, side by side: ms per tick on the tiny pair.

    python scripts/loop_ab.py 119985d HEAD --pairs 4 --reps 3 [--stub] [--calls]

Each commit is checked out in a temporary worktree and measured in processes of its own,
alternating (A, B, A, B, ...), so a load that comes and goes on a shared machine falls on
both. A process builds the tests' tiny base and guidance (`tests/tiny.py`), warms up, then
times `base` and `blendin` at 16 streams and 1 stream, `--reps` times each, and prints the
median ms per tick; this script prints each side's median over the pairs and B ÷ A per pair
(median and range). It uses the commit's own `scripts/benchmark.py` helpers, so it measures
any commit that has them, before or after the import root moved. With `--stub` the workers
answer at once with canned summaries (a confidence junction every 4th step), so only the
loop's own work is timed: what a change to the loop changes. `--calls` counts the Python
function calls of a run instead (cProfile), a measure the machine's load does not move.
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
reps, sides, stub = int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "stub"
calls = sys.argv[5] == "calls"
try:
    from junction.shared.types import Candidates, ModelInfo, StepResult
except ImportError:  # a commit from before the import root
    from shared.types import Candidates, ModelInfo, StepResult

# A worker that answers at once with canned summaries: the loop's own cost alone. Its top-1
# probability is 0.2 at every 4th step (a confidence junction at tau 0.4).
class Stub:
    def __init__(self, role):
        self.role, self.steps = role, {}
    def info(self):
        return ModelInfo(self.role, "stub", "stub", 100, 4096, "cpu")
    def open(self, seq_id, prompt=None, messages=None, seed=None):
        self.steps[seq_id] = 0
        return 4
    def open_many(self, opens):
        return [self.open(*args) for args in opens]
    def close(self, seq_id):
        self.steps.pop(seq_id, None)
    def close_many(self, seq_ids):
        for seq_id in seq_ids:
            self.close(seq_id)
    def live(self):
        return len(self.steps)
    def one(self, req):
        n = self.steps[req.seq_id] = self.steps[req.seq_id] + 1
        p = 0.2 if n % 4 == 0 else 0.9
        k = req.k
        top = Candidates(list(range(5, 5 + k)), [f" w{i}" for i in range(k)],
                         [-0.1] + [-3.0] * (k - 1), 0.3, p)
        return StepResult(req.seq_id, top, 5, " w0", False, 1)
    def step(self, reqs):
        out = []
        for req in reqs:
            ahead, tau = req.ahead, getattr(req.ahead, "tau", None)
            steps = [self.one(req)]
            while ahead is not None and len(steps) < ahead.steps and not (
                    tau is not None and steps[-1].top.top1_prob < tau):
                steps.append(self.one(req))
            last = steps[-1]
            last.earlier = steps[:-1]
            out.append(last)
        return out

if stub:
    runners = {role: b.LocalHandle(Stub(role)) for role in ("base", "guidance")}
else:
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
def counted(policy, streams):
    import cProfile, pstats
    profile = cProfile.Profile()
    profile.runcall(asyncio.run, one(policy, streams))
    return pstats.Stats(profile).total_calls
measure = counted if calls else lambda p, n: asyncio.run(one(p, n))
times = {f"{p}/{n}": [measure(p, n) for _ in range(reps)] for p, n in sides}
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def worktree(rev: str, into: Path) -> Path:
    path = into / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev],
                   check=True)
    return path


def measure(tree: Path, reps: int, stub: bool, calls: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tree), str(reps), json.dumps(SIDES),
         "stub" if stub else "models", "calls" if calls else "ms"],
        cwd=tree, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="commit A (e.g. the one before a change)")
    parser.add_argument("b", help="commit B")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", action="store_true",
                        help="count the Python function calls of one run (cProfile) instead "
                        "of timing it: the same on every run, whatever the machine's load")
    parser.add_argument("--stub", action="store_true",
                        help="workers that answer at once with canned summaries: the loop's "
                        "own cost, without the models' (which dominate and vary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="junction-ab-") as tmp:
        trees = {rev: worktree(rev, Path(tmp)) for rev in (args.a, args.b)}
        try:
            runs: dict[str, list[dict]] = {args.a: [], args.b: []}
            for pair in range(args.pairs):
                for rev in (args.a, args.b) if pair % 2 == 0 else (args.b, args.a):
                    runs[rev].append(measure(trees[rev], args.reps, args.stub, args.calls))
                    print(f"pair {pair + 1}: {rev} {runs[rev][-1]}", file=sys.stderr)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)
    unit = "calls per run" if args.calls else "ms per tick"
    print(f"{unit:14s} {args.a:>10s} {args.b:>10s}   B ÷ A per pair: median [range]")
    for side in runs[args.a][0]:
        a = [r[side] for r in runs[args.a]]
        b = [r[side] for r in runs[args.b]]
        ratios = sorted(y / x for x, y in zip(a, b, strict=True))
        print(f"{side:14s} {statistics.median(a):10.2f} {statistics.median(b):10.2f}   "
              f"{statistics.median(ratios):.2f} [{ratios[0]:.2f} – {ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
