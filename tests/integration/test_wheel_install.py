"""A real install: the wheel built from this checkout, in a fresh virtualenv outside it, runs the
quickstart (a fleet, an event on amd64 and arm64, the summary DataFrame) from another directory.

The dependencies come from a wheelhouse that ``pip download`` fills once per dependency set
(``~/.cache/cronium-nb/wheelhouse-<hash>``, or under ``$XDG_CACHE_HOME``), so a run after the
first installs offline in about 20 s; the virtualenv itself is new every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.fleet
EXTRAS = "[fleet,notebook]"
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}

QUICKSTART = """
import json, sys
from pathlib import Path

import cronium_nb as cn
from cronium_nb import resources

with cn.Fleet.up(amd64=1, arm64=1, name_prefix="wheel-") as fleet:
    with cn.Executor(inventory=fleet.inventory, state_dir=Path(sys.argv[1])) as executor:
        res = executor.run(cn.Event(name="quickstart", script="uname -m", type="bash", timeout=300))
        print(res.summary.to_string(index=False))
        report = {
            "package": cn.__file__,
            "runner_dist": str(resources.runner_dist()),
            "examples": sorted(p.name for p in resources.notebooks_dir().glob("*.ipynb")),
            "status": res.status.value,
            "summary": res.summary[["server", "arch", "status"]].to_dict("records"),
            "lines": {server: rows["line"].tolist() for server, rows in res.logs.groupby("server")},
        }
print("REPORT " + json.dumps(report))
"""


def run(argv: list[str | Path], *, timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def clean_env(venv: Path) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def wheelhouse_for(wheel: Path, python: Path) -> Path:
    """A directory of every wheel the install needs, filled once per dependency set."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = sorted(line for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    key = hashlib.sha256(json.dumps([requires, EXTRAS, sys.version_info[:2], platform.machine()]).encode()).hexdigest()[
        :16
    ]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cronium-nb"
    wheelhouse = cache / f"wheelhouse-{key}"
    if wheelhouse.is_dir():
        return wheelhouse
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="wheelhouse-partial-", dir=cache))
    try:
        run([python, "-m", "pip", "download", "-q", "-d", partial, f"{wheel}{EXTRAS}"], timeout=600)
        for own in partial.glob("cronium_nb-*"):
            own.unlink()
        for old in cache.glob("wheelhouse-*"):  # another dependency set's, or an interrupted fill
            if old != partial:
                shutil.rmtree(old, ignore_errors=True)
        partial.rename(wheelhouse)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if not wheelhouse.is_dir():  # a concurrent run may have filled it meanwhile
            raise
    return wheelhouse


def test_the_wheel_installs_in_a_fresh_virtualenv_and_runs_the_quickstart(tmp_path: Path) -> None:
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", REPO_ROOT],
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("cronium_nb-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    wheelhouse = wheelhouse_for(wheel, python)
    env = clean_env(venv)
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            wheelhouse,
            "--no-compile",
            f"{wheel}{EXTRAS}",
        ],
        timeout=600,
        env=env,
        cwd=tmp_path,
    )

    version = run([venv / "bin" / "cronium-runner", "version"], timeout=60, env=env, cwd=tmp_path)
    assert "static" in version.stdout and platform.machine() in version.stdout, version.stdout

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "quickstart.py").write_text(QUICKSTART)
    env["CRONIUM_HOME"] = str(tmp_path / "home")
    result = run([python, "quickstart.py", tmp_path / "state"], timeout=420, env=env, cwd=workdir)
    print(result.stdout)
    report = json.loads(result.stdout.split("REPORT ", 1)[1])

    site_packages = venv.resolve()
    assert Path(report["package"]).resolve().is_relative_to(site_packages), report["package"]
    assert Path(report["runner_dist"]).resolve().is_relative_to(site_packages), report["runner_dist"]
    assert "01-quickstart.ipynb" in report["examples"]
    assert report["status"] == "success", result.stdout
    assert {row["server"]: row["status"] for row in report["summary"]} == {
        "wheel-amd64-1": "success",
        "wheel-arm64-1": "success",
    }
    assert report["lines"] == {f"wheel-{arch}-1": [machine] for arch, machine in MACHINES.items()}
