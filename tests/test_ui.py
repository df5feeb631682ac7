"""The MLflow UI, served locally and opened in headless Chromium, shows a sweep as a table (the parent
run with its cells nested under it, the grid axes as columns) under the sweep's description: its
results table, findings and curves. Saves screenshots (RS_UI_SHOT=<png>: keep the description's)."""

import contextlib
import os
import shutil
import subprocess
import time

import pytest
from servers import mlflow_server

from retrieval_scaling.tracking import CellRun, close_run, open_parent_run
from retrieval_scaling.tracking_client import client

pytestmark = pytest.mark.slow

CELLS = [(m, p, lo) for m in ("tiny_s", "tiny_m") for p in ("sparse", "dense") for lo in ("cl", "kd")]
FLAGS = ("--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
         "--disable-component-update --disable-sync --window-size=2400,1200").split()


def chromium() -> tuple[str, str]:
    """Debian's chromium and its driver, installed with apt when missing (as root)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0:
            pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver")
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True,
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("chromium"), shutil.which("chromedriver")


@contextlib.contextmanager
def browser(uri: str, tmp_path):
    """Headless Chromium and an MLflow server on `uri`: (driver, server URL)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.binary_location = binary
    with mlflow_server(uri, tmp_path / "art", tmp_path / "server.log", workers=1) as url:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            yield driver, url
        finally:
            driver.quit()


def test_the_ui_tells_the_sweeps_story_and_shows_its_cells_with_the_axes_as_columns(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from retrieval_scaling.curves import curves_for_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sizes = {"tiny_s": 4e5, "tiny_m": 8e5}
    for sweep in ("ui", "story"):  # the same cells: the columns on one page, the description on the other
        parent = open_parent_run(uri, sweep, tmp_path / "art", {"grid.cells": len(CELLS)}, [])
        for model, paradigm, loss in CELLS:
            ndcg = 0.1 + (0.05 if model == "tiny_m" else 0) + (0.02 if paradigm == "sparse" else 0)
            run = CellRun(uri, sweep, tmp_path / "art", f"{model}-{paradigm}-{loss}",
                          {"model": model, "paradigm": paradigm, "loss": loss,
                           "run_name": f"{model}-{paradigm}-{loss}"},
                          {"params_non_embedding": str(sizes[model]), "flops_total": "2e12", "flops_budget": "2e12"})
            run.log_metrics({"scifact/ndcg_10": ndcg}, step=10)
            run.finish("FINISHED")
        close_run(uri, parent)
    curves_for_sweep(uri, "story", "scifact/ndcg_10", tmp_path, bootstrap=50)  # writes the description
    experiment = client(uri).get_experiment_by_name("ui").experiment_id
    story_experiment = client(uri).get_experiment_by_name("story").experiment_id

    with browser(uri, tmp_path) as (driver, url):
        driver.get(f"{url}/#/experiments/{experiment}/runs")
        wait = WebDriverWait(driver, 60)
        parent_link = "//a[normalize-space()='sweep ui']"
        # the Columns menu lists tags only once the runs have loaded
        wait.until(ec.presence_of_element_located((By.XPATH, parent_link)))
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Columns']"))).click()
        for tag in ("model", "paradigm", "loss"):  # tag columns are chosen in this menu
            wait.until(ec.element_to_be_clickable((By.XPATH, f"//*[normalize-space(text())='{tag}']"))).click()
        driver.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape closes the menu
        for close in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):  # assistant panel
            close.click()
        expander = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"{parent_link}/preceding::*[self::button or @role='button'][1]")))
        expander.click()  # the cells are nested under the sweep's parent run
        wait.until(ec.presence_of_element_located((By.XPATH, "//a[normalize-space()='tiny_m-dense-kd']")))
        time.sleep(1)
        driver.save_screenshot(str(tmp_path / "mlflow-ui.png"))
        table = driver.find_element(By.TAG_NAME, "body").text
        driver.get(f"{url}/#/experiments/{story_experiment}/runs")
        wait.until(ec.presence_of_element_located((By.XPATH, "//a[normalize-space()='sweep story']")))
        # the description shows its first line; the button after its edit pencil unfolds the rest
        first_line = "//*[text()[contains(., 'refreshes this text')]]"
        wait.until(ec.element_to_be_clickable((By.XPATH, f"({first_line}/following::button)[2]"))).click()
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'non-embedding params')]")))
        time.sleep(2)  # the curves image loads
        shot = tmp_path / "mlflow-description.png"
        driver.save_screenshot(str(shot))
        story = driver.find_element(By.TAG_NAME, "body").text
        images = driver.execute_script(
            "return [...document.images].filter(i => i.src.includes('get-artifact')).map(i => i.naturalWidth)")
    if os.environ.get("RS_UI_SHOT"):  # where a person wants to look at it
        shutil.copy(shot, os.environ["RS_UI_SHOT"])
    assert (tmp_path / "mlflow-ui.png").stat().st_size > 50_000
    lines = table.splitlines()
    assert "sweep ui" in lines and "Tags" in lines
    assert {"model", "paradigm", "loss"} <= set(lines)  # the grid axes as column headers
    for model, paradigm, loss in CELLS:
        assert f"{model}-{paradigm}-{loss}" in lines
    assert lines.count("tiny_m") == 4 and lines.count("sparse") == 4 and lines.count("kd") == 4  # cell values
    assert f"{len(CELLS) + 1} matching runs" in table
    # the story: what the sweep is, the metric by model × paradigm × loss, the findings, the curves
    assert "8 finished cells" in story and "non-embedding params" in story and "sparse cl" in story
    assert "0.1700" in story and "2. sparse beats dense" in story
    assert images and all(w > 0 for w in images)  # the curves image, from the parent run's artifacts
