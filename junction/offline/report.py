"""What evaluations and diagnoses print and draw: a Markdown table, quality-against-rate
plots (SIA's Figure 2 shape) and histograms of where junctions fall (SIA's Figure 5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from junction.offline.scoring import Metric

REFERENCE_POLICIES = ("base", "guidance")  # drawn as horizontal lines: the two ends


def _pyplot():
    """matplotlib's pyplot on a file backend, or None where matplotlib is not installed
    (the numbers are still written; only the pictures are skipped)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    se = stat.get("stderr")
    return f"{stat['mean']:.3f} ± {se:.3f}" if se is not None else f"{stat['mean']:.3f}"


def _rate(row: dict) -> str:
    """The pooled rate (junctions / steps), with the s.e. of the per-request rates."""
    rate = row.get("intervention_rate")
    if rate is None:
        return "n/a"
    se = (row.get("per_request_rate") or {}).get("stderr")
    return f"{rate:.1%} ± {se:.1%}" if se is not None else f"{rate:.1%}"


def gain_metric(rows: Sequence[dict], metrics: Sequence[Metric]) -> Metric | None:
    """The metric whose paired gain over base the table shows: the reward where there is
    one, else the first metric with a paired gain (None when no row has one)."""
    keys = {k for r in rows for k in r.get("gain_over_base") or {}}
    ranked = sorted(metrics, key=lambda m: m.key != "reward")
    return next((m for m in ranked if m.key in keys), None)


def markdown_table(rows: Sequence[dict], metrics: Sequence[Metric]) -> str:
    """One line per policy: each metric as mean ± standard error (n), the paired gain over
    base on the same items (where base was run), rate, work, seconds."""
    gain = gain_metric(rows, metrics)
    gain_head = [f"{gain.label} − base (paired)"] if gain else []
    head = ["policy", "items", *[m.label for m in metrics], *gain_head, "intervention rate",
            "base / value / guidance tokens", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        work = r.get("work", {})
        tokens = " / ".join(str(work.get(k, 0)) for k in
                            ("base_tokens", "value_tokens", "guidance_tokens"))
        cells = [r["policy"], str(r["items"]),
                 *[_cell(r["metrics"].get(m.key)) for m in metrics],
                 *([_cell((r.get("gain_over_base") or {}).get(gain.key))] if gain else []),
                 _rate(r), tokens, f"{r['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _family(label: str) -> str:
    return label.split(":")[0]


def quality_plot(rows: Sequence[dict], metrics: Sequence[Metric], path: Path,
                 title: str) -> bool:
    """Each metric against the intervention rate, one panel per metric: base-only and
    guidance-only as horizontal lines, every other policy as points (a family's points
    joined in order of rate, as a sweep). False when there was nothing to draw."""
    def has(metric: Metric, row: dict) -> bool:
        return (row["metrics"].get(metric.key) or {}).get("mean") is not None

    shown = [m for m in metrics if any(has(m, r) for r in rows)]
    # A panel with only the reference lines says nothing the table does not; keep the
    # panels that have points, unless none has.
    with_points = [m for m in shown if any(has(m, r) and r["policy"] not in REFERENCE_POLICIES
                                           and r.get("intervention_rate") is not None
                                           for r in rows)]
    shown = with_points or shown
    plt = _pyplot()
    if not shown or plt is None:
        return False

    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    colors = {"base": "black", "guidance": "tab:green"}
    for ax, metric in zip(axes[0], shown, strict=True):
        families: dict[str, list[tuple[float, float, float, str]]] = {}
        for r in rows:
            stat = r["metrics"].get(metric.key) or {}
            if stat.get("mean") is None:
                continue
            mean, se = stat["mean"], stat.get("stderr") or 0.0
            if r["policy"] in REFERENCE_POLICIES:
                color = colors[r["policy"]]
                ax.axhline(mean, color=color, linestyle="--", label=f"{r['policy']} only")
                ax.axhspan(mean - se, mean + se, color=color, alpha=0.08)
            elif r.get("intervention_rate") is not None:
                point = (r["intervention_rate"], mean, se, r["policy"])
                families.setdefault(_family(r["policy"]), []).append(point)
        for name, points in families.items():
            points.sort()
            xs, ys, es = ([p[i] for p in points] for i in range(3))
            ax.errorbar(xs, ys, yerr=es, fmt="o-" if len(points) > 1 else "o", capsize=3,
                        label=name)
            if len(points) == 1:
                ax.annotate(points[0][3], (xs[0], ys[0]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        ax.set_xlabel("intervention rate (junction steps / decode steps)")
        ax.set_ylabel(metric.label)
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, title, path)
    return True



def _save(plt, fig, title: str, path: Path) -> None:
    """Title, lay out, write and release a figure (both plots end this way)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

# --------------------------------------------------------------------- junction positions
def position_histogram(positions: Sequence[float], bins: int = 10) -> list[int]:
    """Counts of relative positions (junction step / answer steps, in [0, 1)) per bin."""
    counts = [0] * bins
    for p in positions:
        counts[min(bins - 1, max(0, int(p * bins)))] += 1
    return counts


def text_histogram(counts: Sequence[int], width: int = 40) -> str:
    """The histogram as text bars, one line per tenth of the answer."""
    top = max(counts, default=0) or 1
    total = sum(counts) or 1
    bins = len(counts)
    lines = []
    for i, c in enumerate(counts):
        bar = "#" * round(width * c / top)
        lines.append(f"{i / bins:4.0%}-{(i + 1) / bins:4.0%} | {bar:<{width}} {c} "
                     f"({c / total:.0%})")
    return "\n".join(lines)


def position_plot(relative: Sequence[float], absolute: Sequence[int], path: Path,
                  title: str) -> bool:
    """Two panels: junctions by relative position in the answer and by decode step. False
    when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    counts = position_histogram(relative)  # the same bins as the text histogram
    width = 1 / len(counts)
    left.bar([i * width for i in range(len(counts))], counts, width=width, align="edge",
             color="tab:blue", edgecolor="white")
    left.set_xlabel("position in the answer (junction step / answer steps)")
    left.set_ylabel("junctions")
    by_step = Counter(absolute)
    right.bar(list(by_step), list(by_step.values()), width=1.0, color="tab:orange",
              edgecolor="white")
    right.set_xlabel("decode step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _save(plt, fig, title, path)
    return True
