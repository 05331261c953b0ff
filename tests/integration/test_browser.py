"""The dashboard in a real browser: JupyterLab on loopback, notebooks/05-dashboard.ipynb opened
in headless Chromium (Debian's, driven by Playwright), all cells run, the dashboard's Run button
clicked, every server's output found on the page, and a screenshot kept."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from cronium_nb import Fleet
from cronium_nb.notebooks import NOTEBOOKS
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.fleet
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
EXPECTED = ["dashboard says hi from amd64-1 (x86_64)", "dashboard says hi from arm64-1 (aarch64)"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path: Path):
    workdir = tmp_path / "lab"
    workdir.mkdir()
    shutil.copy(NOTEBOOKS / "05-dashboard.ipynb", workdir)
    settings = tmp_path / "lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"autoStartDefaultKernel": True}))
    port, token = free_port(), secrets.token_hex(16)
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={workdir}", "--LabApp.news_url=", "--ServerApp.open_browser=False",
            f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # the kernel's temporary files (the notebook's mkdtemp() state dir) go with the test's
        env={**os.environ, "CRONIUM_HOME": str(tmp_path / "cronium-home"), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while True:  # poll until the server answers
        try:
            opener.open(f"{base}/api/status?token={token}", timeout=2).close()
            break
        except OSError:
            assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.2)
    # A kernel session made beforehand: JupyterLab attaches the notebook to it instead of
    # sometimes asking which kernel to start.
    session = urllib.request.Request(
        f"{base}/api/sessions?token={token}",
        data=json.dumps({"path": "05-dashboard.ipynb", "type": "notebook", "kernel": {"name": "python3"}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener.open(session, timeout=60).close()
    yield base, token
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
    Fleet.cleanup_stale()  # the notebook's fleet, should its kernel not have ended cleanly


def drive_dashboard(page, base: str, token: str, screenshot: Path) -> str:
    """Open the notebook, run all its cells, click the dashboard's Run; returns the page text."""
    page.goto(f"{base}/lab/tree/05-dashboard.ipynb?token={token}")
    page.locator(".jp-Notebook").first.wait_for()
    idle_kernel = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first
    try:
        idle_kernel.wait_for(timeout=60_000)
    except PlaywrightTimeout:
        # Seen once with the suite in three processes: a stylesheet of JupyterLab's own failed to
        # load ("Error Loading Theme") and the page never attached the kernel. Reload it, as a
        # user would; the dashboard under test has not been touched yet.
        page.screenshot(path=str(screenshot.with_name("dashboard-first-load.png")), full_page=True)
        warnings.warn("JupyterLab's first page load attached no kernel within 60 s: reloaded", stacklevel=1)
        page.reload()
        idle_kernel.wait_for()
    run_button = page.locator("button.jupyter-button", has_text="Run").first
    accept_kernel = page.locator(".jp-Dialog .jp-mod-accept").first
    first_prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    for _attempt in range(4):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:  # JupyterLab can drop a run request while it attaches the kernel: then ask again
            page.wait_for_function(
                "prompt => /\\[(\\*|\\d+)\\]/.test(prompt.textContent)",
                arg=first_prompt.element_handle(),
                timeout=20_000,
            )
            break
        except PlaywrightTimeout:
            if accept_kernel.is_visible():  # it asked which kernel (its own choice preselected)
                accept_kernel.click()
    run_button.wait_for()
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('button.jupyter-button'))"
        ".some(b => b.textContent.trim() === 'Run' && !b.disabled)"
    )
    run_button.click()
    page.wait_for_function("expected => expected.every(text => document.body.textContent.includes(text))", arg=EXPECTED)
    page.wait_for_function("() => document.body.textContent.includes('success (execution')")
    page.screenshot(path=str(screenshot), full_page=True)
    return page.locator("body").text_content() or ""


def test_dashboard_runs_from_a_click_in_a_real_browser(jupyterlab) -> None:
    base, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(120_000)
        try:
            text = drive_dashboard(page, base, token, screenshot)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    for expected in EXPECTED:
        assert expected in text
    assert screenshot.stat().st_size > 10_000
