"""`junction evaluate` and `junction diagnose` on the embedded models: a short real run in
process and the same run with --url against a live server (real uvicorn; in-process workers,
so no Ray start), greedy, so both must give the same completions and counters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from junction.cli import app
from junction.gateway.app import create_app, local_workers
from junction.shared.config import JunctionConfig, Limits
from tests.gateway.test_api import Server

DATA = Path("../shared/data")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    config = JunctionConfig(value=None, limits=Limits(max_tokens=64, max_concurrency=4))
    app_ = create_app(config, workers_factory=local_workers, workers_stop=None)
    with Server(app_) as srv:
        srv.wait_ready(timeout=900)
        yield srv


def run(command: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [command, *args])
    return result.exit_code, result.output


def items(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "items.jsonl").read_text().splitlines()]


def test_xstest_in_process_and_over_url(server: Server, tmp_path: Path) -> None:
    common = ["--data", str(DATA / "xstest_dev.csv"), "--limit", "2", "--max-tokens", "8",
              "--policy", "base", "--policy", "blendin"]
    code, output = run("evaluate", *common, "--out", str(tmp_path / "local"))
    assert code == 0, output
    assert "refusal rate" in output
    code, output = run("evaluate", *common, "--url", server.url, "--out", str(tmp_path / "url"))
    assert code == 0, output
    assert "refusal rate" in output

    def key(out: Path) -> list[tuple]:
        return [(i["policy"], i["row"], i["completion"], i["interventions"]) for i in items(out)]

    assert key(tmp_path / "local") == key(tmp_path / "url")
    assert all(i["steps"] > 0 for i in items(tmp_path / "url"))


def test_truthfulqa_mc1_under_base_and_guidance(tmp_path: Path) -> None:
    code, output = run("evaluate", "--data", str(DATA / "truthfulqa_dev.csv"), "--limit", "2",
                       "--max-tokens", "8", "--policy", "base", "--policy", "guidance",
                       "--out", str(tmp_path))
    assert code == 0, output
    rows = {r["policy"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    for name in ("base", "guidance"):
        assert rows[name]["metrics"]["mc1"]["n"] == 2
        assert rows[name]["metrics"]["truth_minus_false"]["n"] == 2


def test_diagnose_the_embedded_pair(server: Server, tmp_path: Path) -> None:
    code, output = run("diagnose", "--n", "2", "--max-tokens", "8", "--url", server.url,
                       "--out", str(tmp_path))
    record = json.loads((tmp_path / "diagnosis.json").read_text())
    assert code == (0 if record["passes"] else 1), output
    assert record["prompts"] == 2 and record["steps"] > 0
    assert "verdict:" in output and "where junctions fall" in output
