"""SIA's calibrated entropy thresholds: one H per intervention ratio, measured offline.

As in the paper, a fixed H per ratio from the pooled entropies of base runs: an easy request
fires rarely and a hard one often, and the share over the data set lands near r. Valid for
one base model and top-k width; saved as `calibration.json` beside the value model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from junction.shared.steering import calibrated_threshold, ratio_threshold

CALIBRATION_FILE = "calibration.json"


@dataclass(slots=True)
class Calibration:
    base: str  # name of the base model whose entropies were measured
    k: int  # top-k width of those entropies
    thresholds: dict[float, float]  # ratio -> entropy threshold H (nats)
    steps: int  # base steps the thresholds were measured on
    source: dict = field(default_factory=dict)  # data, split, prompts, max_tokens, command

    def threshold(self, ratio: float) -> float | None:
        """H for this ratio (interpolated); None outside the calibrated ratios."""
        return calibrated_threshold(self.thresholds, ratio)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["thresholds"] = {f"{r:g}": h for r, h in sorted(self.thresholds.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        thresholds = {float(r): float(h) for r, h in data["thresholds"].items()}
        return cls(data["base"], int(data["k"]), thresholds, int(data["steps"]),
                   dict(data.get("source", {})))


def calibrate(
    entropies: Iterable[float], ratios: Iterable[float], base: str, k: int, source: dict
) -> Calibration:
    """Thresholds for each ratio from the pooled entropies of base runs."""
    pooled = sorted(entropies)
    if not pooled:
        raise ValueError("data: the base runs produced no steps to calibrate on")
    thresholds = {r: ratio_threshold(pooled, r) for r in sorted(set(ratios))}
    return Calibration(base, k, thresholds, len(pooled), source)


def save_calibration(calibration: Calibration, path: Path) -> Path:
    """Write to `path` (a file, or a directory that gets `calibration.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    return path


def load_calibration(path: Path) -> Calibration | None:
    """The calibration at `path` (a file or a directory holding one); None when absent."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    if not path.is_file():
        return None
    return Calibration.from_dict(json.loads(path.read_text()))
