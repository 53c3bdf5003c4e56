"""`junction evaluate`: any mix of policies on a public set, in process or against a server.

    junction evaluate --data FILE --policy P [--policy P ...] [--limit N] [--seed S]
                      [--out DIR] [--url http://host:port] [--sweep] [--reward SPEC]

The data set's kind comes from its rows (`junction.offline.scoring.detect_kind`) and sets what is
measured: XSTest refusal rate on unsafe prompts and compliance rate on safe ones,
TruthfulQA truth-minus-false (ROUGE-L) and MC1 by likelihood, GSM8K accuracy, and on any
set the reward of `--reward` (a `junction.offline.rewards` source). Every completion is one line of
`items.jsonl` (prompt, completion, counters, scores); a run that stops resumes where it
left off (items already in the file are skipped). `summary.json`, `results.md` and
`quality.png` (each metric against the intervention rate) are rewritten at the end.
`--sweep` adds SIA over target ratios and BlendIn/Nudging over τ, with base-only and
guidance-only as the reference lines.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from tqdm import tqdm

from junction.offline.backends import EvalError, HttpBackend, LocalBackend, Outcome
from junction.offline.datasets import Example, load_split
from junction.offline.report import markdown_table, quality_plot
from junction.offline.rewards import ReferenceReward, RewardSource, reward_from_spec
from junction.offline.scoring import (
    KIND_METRICS,
    REWARD_METRIC,
    Metric,
    detect_kind,
    item_scores,
    mc1_choices,
    mc1_pick,
    mean_stderr,
    paired_gain,
    summarize,
)
from junction.offline.train_value import _command_line, _override, user_error
from junction.shared.config import (
    JunctionConfig,
    ModelSpec,
    PolicyConfig,
    SamplingParams,
    check_config,
    load_config,
)
from junction.shared.policy_spec import policy_from_spec

if TYPE_CHECKING:  # the engine (torch) is imported when a command runs: --help stays fast
    from junction.gateway.sequence import GenerationRequest

SWEEP_RATIOS = (0.0, 0.1, 0.2, 0.4, 0.6, 1.0)  # SIA target ratios (SIA's Figure 2)
SWEEP_TAUS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)  # BlendIn / Nudging confidence thresholds
# Per kind: default max tokens and stop strings. GSM8K needs room to reason; a TruthfulQA
# answer is one line; chat requests end at the end of the turn (the engine adds the stops).
KIND_DEFAULTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "xstest": (64, ()),
    "truthfulqa": (32, ("\n",)),
    "gsm8k": (192, ("\n\n", "\nQuestion:")),
    "prompts": (64, ()),
}
ITEMS, SUMMARY, TABLE, PLOT, RUN = (
    "items.jsonl", "summary.json", "results.md", "quality.png", "run.json"
)


def sweep_specs() -> list[str]:
    """The sweep: both ends, SIA over target ratios, BlendIn and Nudging over τ."""
    return [
        "base", "guidance",
        *[f"sia:target_ratio={r:g}" for r in SWEEP_RATIOS],
        *[f"blendin:tau={t:g}" for t in SWEEP_TAUS],
        *[f"nudging:tau={t:g}" for t in SWEEP_TAUS],
    ]


def parse_policies(specs: Sequence[str]) -> dict[str, PolicyConfig]:
    """Label (the spec as written) -> policy, in order, without repeats."""
    return {spec.strip(): policy_from_spec(spec) for spec in dict.fromkeys(specs)}


def select_rows(data: Path, split: str, limit: int | None, sample: bool,
                seed: int) -> list[Example]:
    """The split's first `limit` rows, or `limit` rows drawn under `seed` (in file order)."""
    if not sample or limit is None:
        return load_split(data, split, limit)
    rows = load_split(data, split)
    chosen = random.Random(seed).sample(rows, min(limit, len(rows)))
    return sorted(chosen, key=lambda ex: ex.row)


def default_chat(kind: str, data: Path) -> bool:
    """XSTest and prompt sets in CSV/jsonl (instructions) go as chat; TruthfulQA, GSM8K and
    plain text lines as the text prompts the base continues (as the value model trained)."""
    return kind == "xstest" or (kind == "prompts" and data.suffix in (".csv", ".jsonl"))


def request_for(ex: Example, chat: bool, policy: PolicyConfig, sampling: SamplingParams,
                seed: int) -> GenerationRequest:
    from junction.gateway.sequence import GenerationRequest

    """One item's request; its seed is the run's seed plus its data row (stable on resume)."""
    sampling = replace(sampling, seed=seed + ex.row, stop=list(sampling.stop))
    if chat:
        return GenerationRequest(messages=[{"role": "user", "content": ex.prompt}],
                                 sampling=sampling, policy=policy)
    return GenerationRequest(prompt=ex.prompt, sampling=sampling, policy=policy)


# --------------------------------------------------------------------- the run's files
@dataclass
class Store:
    """The output directory: items so far, wall time per policy, the run's settings."""

    out: Path
    settings: dict

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        run = self.out / RUN
        if run.is_file():
            before = json.loads(run.read_text())
            if before["settings"] != self.settings:
                changed = sorted(k for k in self.settings
                                 if before["settings"].get(k) != self.settings[k])
                raise ValueError(f"out: {self.out} holds a run with other settings "
                                 f"({', '.join(changed)}); pick another --out")
            self.seconds: dict[str, float] = before.get("seconds", {})
        else:
            self.seconds = {}
        self.items: list[dict] = []
        if (self.out / ITEMS).is_file():
            lines = (self.out / ITEMS).read_text(encoding="utf-8").splitlines()
            self.items = [json.loads(ln) for ln in lines if ln.strip()]
        self._save_run()

    def done(self, label: str) -> set[int]:
        return {i["row"] for i in self.items if i["policy"] == label}

    def add(self, label: str, rows: list[dict], seconds: float) -> None:
        with open(self.out / ITEMS, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.items += rows
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        self._save_run()

    def _save_run(self) -> None:
        record = {"settings": self.settings, "seconds": self.seconds}
        (self.out / RUN).write_text(json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------- one run
@dataclass
class Plan:
    kind: str
    examples: list[Example]
    policies: dict[str, PolicyConfig]
    sampling: SamplingParams
    seed: int
    chat: bool
    reward: RewardSource | None


def item_row(plan: Plan, label: str, ex: Example, out: Outcome) -> dict:
    prompt = ex.prompt if not plan.chat else [{"role": "user", "content": ex.prompt}]
    row = {"policy": label, "row": ex.row, "seed": plan.seed + ex.row, "prompt": prompt,
           "completion": out.text, "finish_reason": out.finish_reason,
           "completion_tokens": out.completion_tokens, "steps": out.steps,
           "interventions": out.interventions, "by_kind": out.by_kind, "work": out.work,
           "latency_s": round(out.latency_s, 3)}
    row.update(item_scores(plan.kind, ex, out.text))
    if plan.reward is not None:
        row["reward"] = plan.reward.score(ex.prompt, out.text, ex.refs)
    return row


def _item_rows(plan: Plan, label: str, done: list[tuple[Example, Outcome]]) -> list[dict]:
    return [item_row(plan, label, ex, out) for ex, out in done]


async def _mc1(backend, plan: Plan, policy: PolicyConfig, ex: Example) -> dict:
    choices, answer = mc1_choices(ex.meta["best"], ex.refs.incorrect, plan.seed, ex.row)
    logprobs = await backend.answer_logprobs(policy.policy, ex.prompt, choices)
    pick = mc1_pick(logprobs)
    return {"mc1": pick == answer, "mc1_pick": pick, "mc1_answer": answer,
            "mc1_choices": len(choices)}


async def run_policy(backend, plan: Plan, store: Store, label: str, bar: tqdm) -> None:
    """Generate (and score) every item of one policy not yet in the store, a batch at a
    time; each finished batch is written before the next starts."""
    policy = plan.policies[label]
    done = store.done(label)
    todo = [ex for ex in plan.examples if ex.row not in done]
    mc1 = plan.kind == "truthfulqa" and backend.likelihood_support(policy.policy) is None
    bar.set_description(label)
    for start in range(0, len(todo), backend.concurrency):
        chunk = todo[start : start + backend.concurrency]
        began = time.perf_counter()
        outs = await asyncio.gather(
            *(backend.generate(request_for(ex, plan.chat, policy, plan.sampling, plan.seed))
              for ex in chunk),
            return_exceptions=True,
        )
        seconds = time.perf_counter() - began
        ok = [(ex, o) for ex, o in zip(chunk, outs, strict=True) if isinstance(o, Outcome)]
        rows = await asyncio.to_thread(_item_rows, plan, label, ok)
        if mc1:
            for row, (ex, _) in zip(rows, ok, strict=True):
                row.update(await _mc1(backend, plan, policy, ex))
        store.add(label, rows, seconds)
        bar.update(len(ok))
        failed = next((o for o in outs if isinstance(o, BaseException)), None)
        if failed is not None:
            raise EvalError(f"{label}: {failed}") from failed


def policy_summary(plan: Plan, label: str, items: list[dict], seconds: float,
                   notes: dict[str, str]) -> dict:
    counted = [i for i in items if i.get("steps") is not None]
    steps = sum(i["steps"] for i in counted)
    rate = None
    if counted and len(counted) == len(items):
        rate = sum(i["interventions"] for i in counted) / steps if steps else 0.0
    work, kinds = Counter(), Counter()
    for i in items:
        work.update(i.get("work") or {})
        kinds.update(i.get("by_kind") or {})
    finish = Counter(i["finish_reason"] for i in items)
    return {
        "policy": label,
        "options": asdict(plan.policies[label]),
        "items": len(items),
        "metrics": summarize(plan.kind, items),
        "intervention_rate": rate,
        "per_request_rate": mean_stderr(i["interventions"] / i["steps"] for i in counted
                                        if i["steps"]),
        "steps": steps if counted else None,
        "by_kind": dict(kinds),
        "work": dict(work),
        "finish_reasons": dict(finish),
        "wall_seconds": seconds,
        "notes": notes.get(label),
    }


def metrics_of(plan: Plan) -> list[Metric]:
    metrics = list(KIND_METRICS[plan.kind])
    return metrics + [REWARD_METRIC] if plan.reward is not None else metrics


async def run_all(backend, plan: Plan, store: Store) -> None:
    async with backend:
        total = sum(len([e for e in plan.examples if e.row not in store.done(label)])
                    for label in plan.policies)
        with tqdm(total=total, unit="item") as bar:
            for label in plan.policies:
                await run_policy(backend, plan, store, label, bar)


def report(plan: Plan, store: Store, backend, out: Path, record: dict) -> str:
    """Write summary.json, results.md and the plot; return the table."""
    rows_wanted = {ex.row for ex in plan.examples}
    notes = {}
    if plan.kind == "truthfulqa":
        for label, policy in plan.policies.items():
            why = backend.likelihood_support(policy.policy)
            if why:
                notes[label] = f"MC1 not measured: {why}"
    rows = []
    for label in plan.policies:
        items = [i for i in store.items if i["policy"] == label and i["row"] in rows_wanted]
        rows.append(policy_summary(plan, label, items, store.seconds.get(label, 0.0), notes))
    metrics = metrics_of(plan)
    if "base" in plan.policies:
        base_items = [i for i in store.items if i["policy"] == "base" and i["row"] in rows_wanted]
        for label, row in zip(plan.policies, rows, strict=True):
            items = [i for i in store.items if i["policy"] == label and i["row"] in rows_wanted]
            gains = {m.key: paired_gain(items, base_items, m.key) for m in metrics}
            row["gain_over_base"] = {k: g for k, g in gains.items() if g["n"]}
    table = markdown_table(rows, metrics)
    (out / SUMMARY).write_text(json.dumps({**record, "rows": rows}, indent=2) + "\n")
    title = f"{record['data']['file']} ({plan.kind}, {len(plan.examples)} items, {backend.where})"
    drawn = quality_plot(rows, metrics, out / PLOT, title)
    lines = [f"# {title}", "", table, ""]
    for note in dict.fromkeys(notes.values()):  # one line per distinct note
        labels = ", ".join(label for label, n in notes.items() if n == note)
        lines.append(f"- {labels}: {note}")
    (out / TABLE).write_text("\n".join(lines).rstrip() + "\n")
    return table + (f"\nplot: {out / PLOT}" if drawn else "")


def evaluate(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="XSTest/TruthfulQA CSV, GSM8K jsonl, or "
                              "any prompt file (as for train-value); its kind is detected."),
    policy: list[str] | None = typer.Option(None, "--policy", help="NAME[:FIELD=VALUE,...], "
                                            "e.g. sia:target_ratio=0.2 (repeatable)."),
    sweep: bool = typer.Option(False, "--sweep", help="Add SIA over target ratios "
                               f"{SWEEP_RATIOS} and BlendIn/Nudging over τ {SWEEP_TAUS}."),
    split: str = typer.Option("eval", help="Rows: eval (odd), train (even) or all."),
    limit: int | None = typer.Option(None, min=1, help="The first N rows of the split."),
    sample: bool = typer.Option(False, "--sample", help="With --limit: N rows drawn at random "
                                "under --seed instead of the first N (XSTest's rows are "
                                "grouped by type)."),
    seed: int = typer.Option(0, help="Item i's request seed is seed + its data row; MC1's "
                             "shuffle is drawn from it too."),
    out: Path = typer.Option(Path("evaluation"), "--out", help="Directory for items.jsonl, "
                             "summary.json, results.md and quality.png (resumed if present)."),
    url: str | None = typer.Option(None, "--url", help="Evaluate a running server instead "
                                   f"(API key from ${'JUNCTION_API_KEY'})."),
    api: str = typer.Option("native", help="With --url: native (/v1/generate) or openai."),
    model: str | None = typer.Option(None, "--model", help="With --api openai: model name."),
    concurrency: int = typer.Option(4, min=1, help="With --url: requests in flight."),
    reward: str | None = typer.Option(None, "--reward", help="Also score every completion "
                                      "with this reward source (as for train-value)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="Default by kind (TruthfulQA 32, GSM8K 192)."),
    temperature: float = typer.Option(0.0, min=0.0, help="Base sampling; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable; "
                                          "'' for none; default by kind)."),
    chat: bool | None = typer.Option(None, "--chat/--plain", help="Send prompts as chat "
                                     "messages or plain text (default by kind)."),
    device: str | None = typer.Option(None, help="Device of the in-process models."),
    base: str | None = typer.Option(None, "--base", help="Base model: HF id or path."),
    guidance: str | None = typer.Option(None, "--guidance", help="Guidance model."),
    value: str | None = typer.Option(None, "--value", help="Value adapter directory."),
    config: str | None = typer.Option(None, "--config", help="YAML config file."),
) -> None:
    """Quality against intervention rate for any mix of policies, on a public set."""
    try:
        specs = [*(sweep_specs() if sweep else []), *(policy or [])]
        if not specs:
            raise ValueError("policy: give at least one --policy (or --sweep)")
        policies = parse_policies(specs)
        if api not in ("native", "openai"):
            raise ValueError("api: must be native or openai")
        cfg = _config(config, base, guidance, value, device)
        examples = select_rows(data, split, limit, sample, seed)
        kind = detect_kind(examples)
        tokens, stops = KIND_DEFAULTS[kind]
        stops = tuple(s for s in stop if s) if stop is not None else stops
        sampling = SamplingParams(max_tokens or tokens, temperature, top_p, None, list(stops))
        source = None
        if reward is not None:
            from junction.shared.models import resolve_device

            source = reward_from_spec(reward, device=str(resolve_device(cfg.base.device)))
            if isinstance(source, ReferenceReward) and any(e.refs is None for e in examples):
                raise ValueError("reward: the reference reward needs rows with references")
        plan = Plan(kind, examples, policies, sampling, seed,
                    default_chat(kind, data) if chat is None else chat, source)
        settings = {"data": data.name, "kind": kind, "split": split, "seed": seed,
                    "sample": sample,
                    "sampling": asdict(sampling), "chat": plan.chat, "reward": reward,
                    "where": url or "in process", "api": api if url else None,
                    "models": {r: asdict(getattr(cfg, r) or ModelSpec())
                               for r in ("base", "guidance", "value")} if not url else None}
        store = Store(out, settings)
        backend = _backend(cfg, policies, url, api, model, concurrency)
        started = time.perf_counter()
        asyncio.run(run_all(backend, plan, store))
    except (ValueError, FileNotFoundError) as exc:
        raise user_error(exc) from exc
    except (EvalError, OSError) as exc:
        typer.echo(f"error: {exc} (finished items are kept; run again to resume)", err=True)
        raise typer.Exit(1) from exc
    record = {"command": _command_line(ctx), "data": {"file": data.name, "kind": kind,
              "split": split, "items": len(examples)}, "settings": settings,
              "seconds_this_run": time.perf_counter() - started}
    typer.echo(report(plan, store, backend, out, record))
    typer.echo(f"saved {out / ITEMS}, {out / SUMMARY} and {out / TABLE}", err=True)


def _config(config: str | None, base: str | None, guidance: str | None, value: str | None,
            device: str | None) -> JunctionConfig:
    cfg = load_config(config)
    cfg.base = _override(cfg.base, base, device)
    cfg.guidance = _override(cfg.guidance, guidance, device)
    cfg.value = _override(cfg.value or ModelSpec(), value, device)
    return check_config(cfg)


def _backend(cfg: JunctionConfig, policies: dict[str, PolicyConfig], url: str | None,
             api: str, model: str | None, concurrency: int):
    """A server's API, or an engine over in-process runners for the roles the policies need."""
    if url is not None:
        return HttpBackend(url, api, concurrency, model)
    from junction.gateway.sequence import GenerationRequest

    roles = {r: None for p in policies.values()
             for r in GenerationRequest(prompt="", policy=p).roles}
    return LocalBackend(cfg, tuple(roles))
