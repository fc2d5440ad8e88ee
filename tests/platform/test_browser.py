"""The MLflow view of a finished study, checked in a real browser.

A tiny study runs for real (two strategies on digits, through Ray Tune, logged by the driver),
``mlflow server`` serves its store on 127.0.0.1 (``MlflowServer``: its own process group,
stopped as a group), and headless Chromium (Debian's ``chromium`` package, driven by Playwright
with the system browser) opens the experiment's runs page. The study's parent runs must be
listed with their ensemble metric ``final_nll`` showing the values MLflow holds, and expanding
a parent must show its child runs, one per trained member. A screenshot goes to ``tmp_path``
and, if ``NESTUNE_SCREENSHOT_DIR`` is set, there too.

Skipped, saying why, where Chromium or Playwright is missing (``.ci/run`` installs Chromium
where the machine lets it; Playwright is a dev extra). ``NESTUNE_CHROMIUM`` points at another
Chromium binary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
STUDY = "tiny-study"
TINY = {"epochs": 1, "C": 4, "layers": 2, "batch_size": 64}


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


@pytest.fixture(scope="module")
def browser():
    """(Chromium's path, Playwright's sync entry point), or a skip that says what is missing;
    checked before the study runs, so a skip costs nothing."""
    return _chromium(), _playwright()


@pytest.fixture(scope="module")
def finished_study(browser, tmp_path_factory):
    """A tiny two-strategy study, run to the end through the public API."""
    from nestune import Study

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    out = tmp_path_factory.mktemp("browser_study")
    result = Study(STUDY, strategies=["random", "nes_re"], seeds=[0], budget=2, ensemble_size=2,
                   train=TINY, data_options={"subset": 300}, output_dir=out, verbose=False).run()
    return out, result


@pytest.fixture()
def served(finished_study):
    """The study's store behind ``mlflow server``, with what the page must show: the parent
    runs' ``final_nll`` and the child runs' names."""
    from mlflow.tracking import MlflowClient

    from nestune.platform.tracking import MlflowServer

    _, result = finished_study
    client = MlflowClient(result.tracking_uri)
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    parents = {r.info.run_name: r.data.metrics["final_nll"] for r in client.search_runs(
        [experiment_id], filter_string="tags.`nestune.role` = 'parent'")}
    children = {r.info.run_name: r.data.tags["mlflow.parentRunId"] for r in client.search_runs(
        [experiment_id], filter_string="tags.`nestune.role` = 'trial'")}
    with MlflowServer(result.tracking_uri) as server:
        server.wait_ready(timeout=180)
        yield server.url, experiment_id, parents, children
    assert not server.alive(), "mlflow server's process group survived stop()"


def test_study_runs_and_ensemble_metrics_show_in_the_mlflow_ui(browser, served, tmp_path):
    chromium, sync_playwright = browser
    url, experiment_id, parents, children = served
    assert sorted(parents) == ["nes_re seed 0", "random seed 0"] and len(children) == 4
    shot = tmp_path / "mlflow_experiment.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 900})
            # MLflow 3 opens an experiment on its GenAI overview unless told the workflow.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning",
                      wait_until="domcontentloaded")
            for name in parents:
                page.get_by_text(name, exact=True).wait_for(timeout=60_000)
            # The ensemble metric's column: switch it on in the column selector.
            page.get_by_role("button", name="Columns").click()
            page.get_by_text("final_nll", exact=True).click()
            page.keyboard.press("Escape")
            header = page.get_by_role("columnheader", name="final_nll").first
            header.wait_for(timeout=30_000)
            for value in parents.values():
                page.get_by_text(repr(value), exact=True).first.wait_for(timeout=30_000)
            # Child runs are folded under their parent: unfold one and its members appear.
            row = page.get_by_role("row").filter(has_text="random seed 0").first
            row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            a_child = next(name for name in children if name.startswith("random"))
            page.get_by_text(a_child, exact=True).wait_for(timeout=30_000)
            # The new column comes last, right of the fold: bring it into the screenshot.
            header.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot), full_page=True)
            body = page.inner_text("body")
        finally:
            browser.close()
    for name, value in parents.items():
        assert name in body and repr(value) in body
    shown_children = [name for name in children if name in body]
    assert sorted(shown_children) == sorted(n for n in children if n.startswith("random"))
    assert shot.stat().st_size > 10_000
    out = os.environ.get("NESTUNE_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
