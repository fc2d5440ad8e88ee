"""The MLflow view of a finished study, checked in a real browser.

A tiny tracking store is written the way a study writes it (``Tracker``: experiment = study,
a parent run per (strategy, seed) with its anytime and final ensemble metrics, a nested child
run per trial), ``mlflow server`` serves it on 127.0.0.1, and headless Chromium (Debian's
``chromium`` package, driven by Playwright with the system browser) opens the experiment's
runs page: the parent runs must be listed, and the ensemble metric ``final_nll`` must show
with its values once its column is switched on. A screenshot goes to ``tmp_path`` and, if
``NESTUNE_SCREENSHOT_DIR`` is set, there too.

Skipped, saying why, where Chromium or Playwright is missing. ``NESTUNE_CHROMIUM`` points at
another Chromium binary.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
STUDY = "tiny-study"
# Values that MLflow's table prints exactly as written.
FINAL_NLL = {("random", 0): 0.4375, ("random", 1): 0.4125, ("nes_re", 0): 0.3125, ("nes_re", 1): 0.3375}


def _chromium() -> str:
    env = os.environ.get("NESTUNE_CHROMIUM")
    if env:
        if not Path(env).is_file():
            pytest.skip(f"NESTUNE_CHROMIUM={env} does not exist")
        return env
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no Chromium browser: install Debian's `chromium` package (apt-get install chromium) "
                "or set NESTUNE_CHROMIUM")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright; its own browser "
                    "download is not needed, the system Chromium is used)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_store(root: Path) -> str:
    """A finished two-strategy, two-seed study as the driver logs it."""
    from nestune.platform.tracking import Tracker

    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, STUDY, artifact_location=(root / "mlartifacts").as_uri())
    for (label, seed), final in FINAL_NLL.items():
        parent = tracker.start_parent(label, seed, {"strategy": label, "seed": seed, "ensemble_size": 2},
                                      tags={"nestune.study": STUDY})
        for m in range(1, 4):
            tracker.log_ensemble(parent, m, {"nll": final + 0.1 / m, "error": 0.1, "accuracy": 0.9,
                                             "device_hours": 0.001 * m})
            entry = {"kind": "member", "trial_id": f"{label}_{seed}_{m}", "ok": True,
                     "job": {"kind": "member", "seed": m}, "metrics": {"val_nll": 0.5},
                     "device_seconds": 3.0}
            tracker.log_trial(parent, entry, label=label, seed=seed)
        tracker.log_final(parent, {"nll": final, "accuracy": 0.875}, [], step=3)
        tracker.end_run(parent)
    return tracker.experiment_id


@pytest.fixture()
def browser():
    """(Chromium's path, Playwright's sync entry point), or a skip that says what is missing;
    checked before the server starts, so a skip costs nothing."""
    return _chromium(), _playwright()


@pytest.fixture()
def mlflow_server(browser, tmp_path):
    """``mlflow server`` over the tiny store, in its own process group (its workers outlive a
    SIGTERM to the main process), stopped as a group."""
    experiment_id = _write_store(tmp_path)
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner workers
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--default-artifact-root", (tmp_path / "mlartifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n"
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = (tmp_path / "server.log").read_text()[-3000:]
                pytest.fail(f"mlflow server not up after 120 s:\n{tail}")
            time.sleep(0.5)
        yield url, experiment_id
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()


def test_study_runs_and_ensemble_metrics_show_in_the_mlflow_ui(browser, mlflow_server, tmp_path):
    chromium, sync_playwright = browser
    url, experiment_id = mlflow_server
    shot = tmp_path / "mlflow_experiment.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 900})
            # MLflow 3 opens an experiment on its GenAI overview unless told the workflow.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning",
                      wait_until="domcontentloaded")
            for label, seed in FINAL_NLL:
                page.get_by_text(f"{label} seed {seed}", exact=True).wait_for(timeout=60_000)
            # The ensemble metric's column: switch it on in the column selector.
            page.get_by_role("button", name="Columns").click()
            page.get_by_text("final_nll", exact=True).click()
            page.keyboard.press("Escape")
            header = page.get_by_role("columnheader", name="final_nll").first
            header.wait_for(timeout=30_000)
            for value in FINAL_NLL.values():
                page.get_by_text(str(value), exact=True).first.wait_for(timeout=30_000)
            # The new column comes last, right of the fold: bring it into the screenshot.
            header.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot), full_page=True)
            body = page.inner_text("body")
        finally:
            browser.close()
    for label, seed in FINAL_NLL:
        assert f"{label} seed {seed}" in body
    assert "final_nll" in body
    assert shot.stat().st_size > 10_000
    out = os.environ.get("NESTUNE_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
