"""The package as installed: a light `import cronium_nb`, a complete wheel, the files it ships."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cronium_nb import resources
from tests.conftest import REPO_ROOT

HEAVY = ("docker", "aiohttp", "matplotlib", "ipywidgets")


def loaded_after(code: str) -> list[str]:
    """The HEAVY top-level modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return [name for name in json.loads(out.stdout.splitlines()[-1]) if name in HEAVY]


def test_import_cronium_nb_loads_no_optional_layer() -> None:
    assert loaded_after("import cronium_nb") == []


def test_the_executor_and_results_load_no_optional_layer() -> None:
    """docker comes with a Fleet, aiohttp with the first API-mode run, the widgets and matplotlib
    with the notebook layer and a plot; the executor itself needs none of them."""
    code = (
        "import cronium_nb as cn\n"
        "cn.Executor, cn.Event, cn.Inventory, cn.ExecutionResult, cn.SSHOptions, cn.FleetError\n"
        "from cronium_nb.runtime_api import RuntimeService\n"
        "RuntimeService()\n"
    )
    assert loaded_after(code) == []


def test_public_names_resolve_lazily() -> None:
    import cronium_nb

    for name in cronium_nb.__all__:
        assert getattr(cronium_nb, name) is not None
    assert set(cronium_nb.__all__) <= set(dir(cronium_nb))
    with pytest.raises(AttributeError):
        _ = cronium_nb.NoSuchThing


def test_in_a_checkout_resources_are_the_checkouts() -> None:
    assert resources.runner_dist() == REPO_ROOT / "runner" / "dist"
    assert resources.notebooks_dir() == REPO_ROOT / "notebooks"
    assert (resources.notebooks_dir() / "01-quickstart.ipynb").is_file()


def test_runner_binary_maps_machine_names_to_builds() -> None:
    if not (resources.runner_dist() / resources.RUNNER_INFO).is_file():
        pytest.skip("no runner builds: run `make runner`")
    assert resources.runner_binary("x86_64").name == "cronium-runner-linux-amd64"
    assert resources.runner_binary("aarch64").name == "cronium-runner-linux-arm64"
    with pytest.raises(FileNotFoundError, match="armv7l"):
        resources.runner_binary("armv7l")


def test_the_wheel_carries_the_runner_the_examples_and_py_typed(tmp_path: Path) -> None:
    info_path = REPO_ROOT / "runner" / "dist" / "runner.json"
    if not info_path.is_file():
        pytest.skip("no runner builds: run `make runner`")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cronium_nb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        modes = {i.filename: i.external_attr >> 16 for i in archive.infolist()}
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        shipped_info = json.loads(archive.read("cronium_nb/_runner/runner.json"))
    assert shipped_info == json.loads(info_path.read_text())
    for arch in shipped_info["binaries"]:
        binary = f"cronium_nb/_runner/cronium-runner-linux-{arch}"
        assert {binary, binary + ".sha256"} <= names
        assert modes[binary] & 0o111, f"{binary} is not executable in the wheel"
    notebooks = {p.name for p in (REPO_ROOT / "notebooks").glob("*.ipynb")}
    assert {f"cronium_nb/_examples/{name}" for name in notebooks} <= names
    assert "cronium_nb/py.typed" in names
    assert "cronium-runner = cronium_nb.resources:main_runner" in entry_points
    assert not any(name.startswith(("tests/", "runner/", "notebooks/")) for name in names)
