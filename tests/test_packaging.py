"""One import root: the wheel holds `junction` alone, and serving never loads offline code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
SERVING = ("junction.gateway", "junction.services", "junction.shared")
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info")


def declared_packages() -> set[str]:
    return set(PYPROJECT["tool"]["setuptools"]["packages"])


def packages_on_disk() -> set[str]:
    """Every folder with an __init__.py under a mapped folder, by its installed name (no
    mapped folder lies inside another)."""
    found = set()
    for name, folder in PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(ROOT / folder).parts)))
    return found


def test_every_package_on_disk_is_declared_and_every_declared_one_exists() -> None:
    assert packages_on_disk() == declared_packages()


def run(code: str, cwd: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_from_outside_the_repo_junction_imports_and_no_generic_name_does(tmp_path: Path) -> None:
    out = run("import junction.gateway.engine, junction.offline.evaluate, junction.cli", tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("gateway", "services", "shared"):
        out = run(f"import {name}", tmp_path)
        assert "ModuleNotFoundError" in out.stderr, (name, out.stderr)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # Built from a copy: a build in place leaves build/ and *.egg-info in the repo.
    for name in ("pyproject.toml", "README.md", *PACKAGE_DIR.values()):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": IGNORED} if copy is shutil.copytree
                                             else {}))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    [built] = out.glob("junction-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package_with_the_shipped_models(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"junction"}
    for wanted in ("junction/gateway/engine.py", "junction/services/actors.py",
                   "junction/offline/evaluate.py", "junction/cli.py",
                   "junction/shared/defaults/value/adapter_model.safetensors",
                   "junction/shared/defaults/diagnose_prompts.jsonl"):
        assert wanted in names
    [top_level] = [n for n in names if n.endswith("top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["junction"]


def test_the_installed_wheel_imports_junction_and_nothing_generic(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # -S: no site-packages, so neither the editable install nor the repo can answer; the
    # modules imported here need nothing beyond the standard library.
    env = {"PYTHONPATH": str(target)}
    code = ("import junction, junction.shared.types, junction.shared.sources as s; "
            "assert s.DEFAULT_VALUE_DIR.is_dir(), s.DEFAULT_VALUE_DIR; "
            f"assert junction.__file__.startswith({str(target)!r})")
    out = run(code, tmp_path, "-S", env=env)
    assert out.returncode == 0, out.stderr
    for name in ("gateway", "services", "shared"):
        out = run(f"import {name}", tmp_path, "-S", env=env)
        assert "ModuleNotFoundError" in out.stderr, (name, out.stderr)


def test_serving_modules_load_no_offline_code(tmp_path: Path) -> None:
    """Every module of the serving packages, imported together, loads nothing offline."""
    code = f"""
import importlib, pkgutil, sys
for root in {SERVING!r}:
    package = importlib.import_module(root)
    for info in pkgutil.walk_packages(package.__path__, root + "."):
        importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.startswith("junction."))
offline = [m for m in loaded if m.startswith("junction.offline") or m == "junction.cli"]
assert not offline, offline
assert "junction.gateway.engine" in loaded and "junction.services.actors" in loaded, loaded
print(len(loaded))
"""
    out = run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 25
