"""A real browser drives the explorer notebook in JupyterLab, opened the README's way.

A temporary repository root holds `notebooks/05_explore_lr_replay.ipynb` (the committed file,
unchanged), `params/quick/` and `outputs/quickstart/`: token files and a small English parent
trained there by the CLI with relative paths, as the quickstart leaves them. JupyterLab starts at
that root; headless Chromium (Debian's `chromium`, driven by Playwright's Python client) opens
`notebooks/` and then the notebook from the file browser, so the kernel starts in `notebooks/` as
a user's does, runs all cells, moves the learning-rate slider with the keyboard, clicks Run, and
waits until the run's trace appears in the plotly figure and the run finishes.

This checks what headless tests cannot: the widget and plotly front-end extensions load, slider
changes reach the kernel, FigureWidget updates sent from the training thread reach the page, and
every relative path (the notebook's parameters, those recorded in the parent's run folder) means
the same in a kernel started in `notebooks/`. Skipped only where Chromium is not installed
(.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from forgetting_lib import runs

from finetune_fixtures import PARENT_CONFIG, B, T, world  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_explore_lr_replay.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PARENT_STEPS = 60
EVALS = 8  # the notebook's evals_per_run: a trajectory has EVALS + 1 points


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_repository(world, repo: Path) -> None:
    """The layout `make quickstart` leaves, at tiny scale, made with relative paths from `repo`."""
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, repo / "notebooks" / NOTEBOOK.name)
    data = repo / "outputs" / "quickstart" / "data"
    data.mkdir(parents=True)
    for src, name in ((world.old, "en"), (world.new, "es")):
        shutil.copy(src, data / f"{name}.bin")
        shutil.copy(src.with_suffix(".json"), data / f"{name}.json")
    params = repo / "params" / "quick"
    params.mkdir(parents=True)
    pretrain = {**PARENT_CONFIG, "stop": {"num_tokens_train": PARENT_STEPS * B * T}}
    pretrain["data"] = {**pretrain["data"], "path": "outputs/quickstart/data/en.bin"}
    (params / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    finetune = {  # the notebook's base_params: relative paths, the architecture from the parent
        "data": {"path": "outputs/quickstart/data/es.bin", "T": T, "batch_size": B, "valid_tokens": 1000,
                 "microbatch_rows": B},
        "model": {"load_path": "outputs/quickstart/runs/pretrain_en"},
        "opt": {"lr": 1e-3, "warmup_tokens": 0},
        "reg": {"replay_batch_size": 4},
        "stop": {"num_tokens_train": 400_000},
        "log": {"every_tokens": 16384, "progress": False},
    }  # fmt: skip
    (params / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    subprocess.run(
        [sys.executable, "-m", "forgetting_lib", "train", "params/quick/pretrain.yaml",
         "--out", "outputs/quickstart/runs/pretrain_en"],
        cwd=repo, check=True, capture_output=True, timeout=300,
    )  # fmt: skip


# User settings of the test's JupyterLab: all cells stay attached to the page (no windowing, so
# widgets scrolled out of view stay visible), no news prompt.
LAB_SETTINGS = {
    "notebook-extension/tracker": {"windowingMode": "none"},
    "apputils-extension/notification": {"fetchNews": "false"},
}


def _start_lab(folder: Path, port: int, token: str) -> subprocess.Popen:
    """JupyterLab serving `folder`, its config, runtime, workspace and settings dirs inside it."""
    settings = folder / ".lab-settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(folder / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(folder / ".runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(folder / ".workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "FORGETTING_PLAIN_PROGRESS": "1",
    }
    log = open(folder / "jupyterlab.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.allow_root=True",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={folder}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_server(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts its kernels down), then kill its process group if needed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server's own session: leftover kernels
    except ProcessLookupError:
        pass
    proc.wait(5)


@pytest.mark.slow
def test_explorer_in_jupyterlab(world, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    repo = tmp_path / "repo"
    _make_repository(world, repo)
    port, token = _free_port(), secrets.token_hex(16)
    proc = _start_lab(repo, port, token)
    try:
        _wait_for_server(proc, f"http://127.0.0.1:{port}/api/status?token={token}", timeout=45)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/lab?token={token}")
                _open_from_file_browser(page, expect, "notebooks", NOTEBOOK.name)
                _drive(page, expect)
            finally:
                browser.close()
    except Exception:
        print((repo / "jupyterlab.log").read_text()[-5000:])
        raise
    finally:
        _stop(proc)
    folders = sorted((repo / "outputs" / "explore").iterdir())
    assert len(folders) == 1 and runs.is_finished(folders[0])
    assert runs.read_config(folders[0])["opt"]["lr"] == pytest.approx(1e-4)  # the slider's value
    assert "prev_ntp" in runs.read_summary(folders[0])["final"]  # the parent's English data was found


def _open_from_file_browser(page, expect, folder: str, name: str) -> None:
    """Double-click `folder`, then `name`, in JupyterLab's file browser."""
    listing = page.locator(".jp-DirListing-content")
    item = listing.locator(".jp-DirListing-itemText").get_by_text(folder, exact=True)
    expect(item).to_be_visible(timeout=45_000)
    item.dblclick()
    notebook = listing.locator(".jp-DirListing-itemText").get_by_text(name, exact=True)
    expect(notebook).to_be_visible()
    notebook.dblclick()


def _run_all_cells(page, expect, attempts: int = 4) -> None:
    """Wait for the kernel (the status bar says Idle once it is connected), then Run > Run All
    Cells until the first code cell is queued or has run (a Run All sent while Lab is still
    settling its session can be lost, so it is repeated, a bounded number of times)."""
    prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    select_kernel = page.locator(".jp-Dialog", has_text="Select Kernel")
    idle = page.locator(".jp-StatusBar-Widget", has_text="| Idle")
    expect(select_kernel.or_(idle).first).to_be_visible(timeout=45_000)
    for _ in range(attempts):
        if select_kernel.is_visible():  # asked when Lab opens the file before it knows the specs
            select_kernel.locator(".jp-mod-accept").click()
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            expect(prompt).not_to_have_text(re.compile(r"^\[ \]:$"), timeout=10_000)
            return
        except AssertionError:
            continue
    raise AssertionError(f"Run All Cells did not start the notebook in {attempts} attempts")


def _drive(page, expect) -> None:
    """Run all cells, set the learning rate to 1e-4 with the keyboard, press Run, see the trace."""
    expect(page.locator(".jp-NotebookPanel .jp-Notebook")).to_be_visible()
    _run_all_cells(page, expect)

    slider = page.locator(".widget-slider", has=page.get_by_text("learning rate", exact=True))
    expect(slider).to_be_visible(timeout=60_000)
    figure = page.locator(".js-plotly-plot")
    expect(figure).to_be_visible()
    expect(figure.locator(".scatterlayer .trace")).to_have_count(0)
    readout = slider.locator(".widget-readout")
    expect(readout).to_have_text("1.0e-3")
    slider.locator(".noUi-handle").focus()
    for _ in range(10):  # step 0.1 on a log10 scale: ten steps down = 1e-4
        page.keyboard.press("ArrowLeft")
    expect(readout).to_have_text("1.0e-4")

    page.locator(".widget-button", has_text="Run").click()
    expect(figure.locator(".scatterlayer .trace")).to_have_count(1, timeout=60_000)
    expect(figure.locator(".legendtext")).to_contain_text(["lr=1e-04"])
    # the trace grows as the run evaluates (EVALS + 1 points), streamed from the thread
    expect(figure.locator(".scatterlayer .trace .point")).to_have_count(EVALS + 1, timeout=90_000)
    expect(page.locator(".widget-html", has_text=re.compile(r"^Finished 001-"))).to_be_visible(timeout=30_000)
    expect(page.locator(".widget-html table")).to_contain_text("forgetting")
