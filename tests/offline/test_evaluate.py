"""`junction evaluate` and `junction diagnose` end to end on tiny models: in process, and
with --url against a real uvicorn server over the same models (native and OpenAI APIs)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from junction.cli import app
from junction.shared.config import JunctionConfig, Limits
from tests.gateway.test_api import Server, serve, tiny_config, tiny_value  # noqa: F401 (fixtures)

DATA = Path("../shared/data")
LIMITS = Limits(max_prompt_tokens=480, max_tokens=16, max_concurrency=8, max_n=2)


@pytest.fixture(scope="module")
def config_file(tiny_config: JunctionConfig, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny models as a YAML config, as a user would write one."""
    path = tmp_path_factory.mktemp("cfg") / "junction.yaml"
    path.write_text(yaml.safe_dump(asdict(replace(tiny_config, limits=LIMITS))))
    return path


@pytest.fixture(scope="module")
def server(tiny_config: JunctionConfig):  # noqa: F811
    with serve(replace(tiny_config, limits=LIMITS)) as srv:
        srv.wait_ready()
        yield srv


def evaluate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *args])
    return result.exit_code, result.output


def items(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "items.jsonl").read_text().splitlines()]


def rows(out: Path) -> dict[str, dict]:
    return {r["policy"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}


def test_truthfulqa_in_process_with_mc1_and_resume(config_file: Path, tmp_path: Path) -> None:
    common = ["--data", str(DATA / "truthfulqa_dev.csv"), "--limit", "2", "--max-tokens", "6",
              "--config", str(config_file), "--out", str(tmp_path)]
    code, output = evaluate(*common, "--policy", "base", "--policy", "guidance")
    assert code == 0, output
    first = items(tmp_path)
    assert len(first) == 4 and {i["row"] for i in first} == {1, 3}  # the eval (odd) rows
    assert all(isinstance(i["truth_minus_false"], float) and "mc1" in i for i in first)
    summary = rows(tmp_path)
    assert summary["base"]["metrics"]["mc1"]["n"] == 2
    assert summary["guidance"]["metrics"]["mc1"]["n"] == 2
    assert summary["base"]["intervention_rate"] == 0.0
    assert summary["base"]["gain_over_base"]["truthful"] == {"mean": 0.0, "stderr": 0.0, "n": 2}
    assert summary["guidance"]["gain_over_base"]["truth_minus_false"]["n"] == 2
    assert "MC1 accuracy" in output and (tmp_path / "quality.png").stat().st_size > 1000

    # Resume: finished items are kept as they are; only the new policy runs.
    code, output = evaluate(*common, "--policy", "base", "--policy", "guidance",
                            "--policy", "blendin:tau=0.6")
    assert code == 0, output
    now = items(tmp_path)
    assert now[:4] == first and [i["policy"] for i in now[4:]] == ["blendin:tau=0.6"] * 2
    blend = rows(tmp_path)["blendin:tau=0.6"]
    assert blend["metrics"]["mc1"]["n"] == 0 and "MC1 not measured" in blend["notes"]
    assert 0 < blend["intervention_rate"] <= 1 and blend["work"]["guidance_tokens"] > 0
    assert "MC1 not measured" in (tmp_path / "results.md").read_text()

    # Other settings in the same directory would mix two runs: refused, naming the setting.
    code, output = evaluate(*common[:-2], "--out", str(tmp_path), "--seed", "1",
                            "--policy", "base")
    assert code == 2 and "seed" in output


def test_xstest_over_url_equals_in_process(config_file: Path, server: Server,
                                           tmp_path: Path) -> None:
    common = ["--data", str(DATA / "xstest_dev.csv"), "--limit", "2", "--max-tokens", "6",
              "--policy", "base", "--policy", "nudging:tau=0.6"]
    local, native, oai = tmp_path / "local", tmp_path / "native", tmp_path / "openai"
    code, output = evaluate(*common, "--config", str(config_file), "--out", str(local))
    assert code == 0, output
    assert "refusal rate" in output and "compliance rate" in output
    code, output = evaluate(*common, "--url", server.url, "--out", str(native))
    assert code == 0, output
    assert "refusal rate" in output
    code, output = evaluate(*common, "--url", server.url, "--api", "openai", "--out", str(oai))
    assert code == 0, output

    def key(out: Path) -> list[tuple]:
        return [(i["policy"], i["row"], i["completion"], i["steps"], i["interventions"])
                for i in items(out)]

    # Greedy decoding: the server's completions and counters are the in-process ones.
    assert key(local) == key(native) == key(oai)
    assert all(isinstance(i["prompt"], list) for i in items(native))  # sent as chat
    for out in (local, native):
        summary = rows(out)
        assert set(summary["base"]["metrics"]) == {"refusal_rate_unsafe", "compliance_rate_safe"}


def test_gsm8k_and_a_bad_policy(config_file: Path, tmp_path: Path) -> None:
    code, output = evaluate("--data", str(DATA / "gsm8k_test_dev.jsonl"), "--limit", "2",
                            "--max-tokens", "4", "--policy", "base", "--config",
                            str(config_file), "--out", str(tmp_path))
    assert code == 0, output
    assert all(i["gold"] is not None and i["correct"] in (True, False) for i in items(tmp_path))
    assert rows(tmp_path)["base"]["metrics"]["accuracy"]["n"] == 2
    code, output = evaluate("--data", str(DATA / "gsm8k_test_dev.jsonl"), "--policy",
                            "blendin:tua=0.3", "--out", str(tmp_path / "bad"))
    assert code == 2 and "tua" in output
    code, output = evaluate("--data", str(DATA / "gsm8k_test_dev.jsonl"), "--policy", "base",
                            "--url", "http://127.0.0.1:9", "--api", "grpc",
                            "--out", str(tmp_path / "bad"))
    assert code == 2 and "api" in output and not (tmp_path / "bad").exists()
    code, output = evaluate("--data", str(DATA / "gsm8k_test_dev.jsonl"), "--policy", "base",
                            "--limit", "1", "--url", "http://127.0.0.1:9",
                            "--out", str(tmp_path / "down"))
    assert code == 1 and "run again to resume" in output  # no server there: a clear error
    result = CliRunner().invoke(app, ["diagnose", "--n", "1", "--url", "http://127.0.0.1:9",
                                      "--out", str(tmp_path / "down")])
    assert result.exit_code == 2 and "error:" in result.output


def test_sweep_draws_every_policy(config_file: Path, tmp_path: Path) -> None:
    code, output = evaluate("--data", str(DATA / "truthfulqa_dev.csv"), "--limit", "1",
                            "--max-tokens", "3", "--sweep", "--config", str(config_file),
                            "--out", str(tmp_path))
    assert code == 0, output
    summary = rows(tmp_path)
    assert len(summary) == 2 + 6 + 6 + 6
    assert summary["sia:target_ratio=0"]["intervention_rate"] == 0.0
    assert summary["sia:target_ratio=1"]["intervention_rate"] == 1.0
    assert (tmp_path / "quality.png").stat().st_size > 1000


def diagnose(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["diagnose", *args])
    return result.exit_code, result.output


def test_diagnose_exit_status_is_the_verdict(config_file: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Why is the sky blue?", "Name a fish.", "What is 2 + 2?"]))
    common = ["--data", str(prompts), "--n", "3", "--max-tokens", "6", "--config",
              str(config_file)]
    # τ = 1: every step's top-1 probability is below it, so every step is a junction (but
    # those inside an unfinished UTF-8 character, which a random tiny model writes).
    code, output = diagnose(*common, "--policy", "blendin:tau=1", "--out", str(tmp_path / "a"))
    assert code == 1, output
    assert "FAIL" in output and "where junctions fall" in output
    record = json.loads((tmp_path / "a" / "diagnosis.json").read_text())
    assert record["prompts"] == 3 and record["intervention_rate"] > 0.5 and not record["passes"]
    assert sum(record["histogram_relative"]) == record["junctions"]
    assert (tmp_path / "a" / "junction_positions.png").stat().st_size > 1000
    # τ = 0: never a junction; the pair passes.
    code, output = diagnose(*common, "--policy", "blendin:tau=0", "--out", str(tmp_path / "b"))
    assert code == 0, output
    assert "intervention rate 0.0%" in output and "PASS" in output


class RequireKey:
    """An ASGI layer in front of the gateway that wants one bearer key (as a deployment
    behind an authenticating proxy, or with the gateway's own keys, does)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and (
            headers.get(b"authorization") != f"Bearer {self.key}".encode()
        ):
            body = b'{"error": {"message": "missing or wrong API key", "type": "auth"}}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def test_api_key_from_the_environment(tiny_config: JunctionConfig, tmp_path: Path,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from junction.gateway.app import create_app, local_workers

    gateway = create_app(replace(tiny_config, limits=LIMITS), workers_factory=local_workers,
                         workers_stop=None)
    with Server(RequireKey(gateway, "s3cret")) as srv:
        srv.wait_ready()
        args = ["--data", str(DATA / "xstest_dev.csv"), "--limit", "1", "--max-tokens", "2",
                "--policy", "base", "--url", srv.url]
        monkeypatch.delenv("JUNCTION_API_KEY", raising=False)
        code, output = evaluate(*args, "--out", str(tmp_path / "a"))
        assert code == 1 and "401" in output and "API key" in output
        monkeypatch.setenv("JUNCTION_API_KEY", "s3cret")
        code, output = evaluate(*args, "--out", str(tmp_path / "b"))
        assert code == 0, output
        assert len(items(tmp_path / "b")) == 1
