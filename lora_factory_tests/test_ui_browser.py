"""What a user sees in the Dagster UI, checked in a real browser (Chromium via Playwright).

One demo character is built as `make demo` builds it (the code location's `character_job`
on the embedded instance), with the tiny base model and short training and rendering (one
checkpoint), into a temp home whose Dagster instance a real `dagster-webserver` serves;
the test then opens the asset pages the way a user does and checks that the tables, the
preview pictures, the model card's pictures and the checks' partition are really shown.
Screenshots of every page go to the test's temp folder.

Needs Chromium (Debian's `chromium` package, or LF_CHROMIUM=<path>) and the `playwright`
package: without them the test is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import service_missing, stop_process_trees

from lora_factory.demo.deployment import TINY_BASE_MODEL
from lora_factory.demo.run import EMBEDDED_INSTANCE

CHARACTER = "ash_ember_knights"
REPO = Path(__file__).resolve().parents[1]
# One checkpoint, two sampling steps: the pages need real results, not good ones (each
# checkpoint costs half a minute of previews on two busy cores).
RUN_CONFIG = {
    "ops": {
        "lora_checkpoints": {"config": {"max_train_steps": 4, "save_every_n_steps": 4}},
        "recscore_table": {"config": {"sampling_steps": 2}},
    }
}
# `make demo` for one character, with RUN_CONFIG: argv = home, character, run config (JSON).
BUILD = """
import json, sys
from pathlib import Path
import dagster as dg
from lora_factory.demo.run import failure_message, prepare_home
from lora_factory.run_health import in_process_run_args

prepare_home(Path(sys.argv[1]))
from lora_factory.definitions import defs
from lora_factory.partitions import characters_partitions

with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions(characters_partitions.name, [sys.argv[2]])
    defs.resolve_job_def("index_job").execute_in_process(instance=instance, **in_process_run_args())
    result = defs.resolve_job_def("character_job").execute_in_process(
        partition_key=sys.argv[2], instance=instance, run_config=json.loads(sys.argv[3]),
        raise_on_error=False, **in_process_run_args(),
    )
    if not result.success:
        sys.exit(failure_message(result))
"""
PAGE_TIMEOUT_MS = 90_000  # the webserver loads the code location on first use; 2 busy cores


def chromium_path() -> str:
    path = os.environ.get("LF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        service_missing("no Chromium here (apt-get install chromium, or set LF_CHROMIUM)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, process: psutil.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"dagster-webserver did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(base URL, Playwright page, screenshot folder) on a home with one built character."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("the playwright package is not installed (pip install playwright)")
    executable = chromium_path()
    home = tmp_path_factory.mktemp("ui_home")
    shots = tmp_path_factory.mktemp("screenshots")
    dagster_home = home / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(EMBEDDED_INSTANCE, dagster_home / "dagster.yaml")  # the webserver starts first
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("LF_INDEX_PATH", "LF_EXECUTOR")},  # the demo's own
        "DAGSTER_HOME": str(dagster_home),
        "LF_HOME": str(home),
        "LF_DEMO_BASE_MODEL": TINY_BASE_MODEL,
        "LF_DEPLOYMENT": "demo",
    }
    # The webserver starts (and loads the code location) while the character is built.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = shots / "webserver.log"
    with open(log, "w") as log_file:
        server = psutil.Popen(
            [str(Path(sys.executable).with_name("dagster-webserver")), "-w", "workspace.yaml",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log_file, stderr=log_file,
        )
    try:
        build = subprocess.run(
            [sys.executable, "-c", BUILD, str(home), CHARACTER, json.dumps(RUN_CONFIG)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        (shots / "build.log").write_text(build.stdout + build.stderr)
        assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
        wait_for_server(url, server, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield url, page, shots
            browser.close()
    finally:
        stop_process_trees([server], timeout_s=15)


def open_partition(page, url: str, asset: str, shots: Path):
    """The asset's Partitions tab on the character: its latest materialization's metadata."""
    page.goto(f"{url}/assets/{asset}?view=partitions&partition={CHARACTER}")
    metadata = page.locator("table").filter(has_text="dagster/row_count" if asset != "chosen_model" else "chosen_step")
    metadata.first.wait_for()
    dismiss_welcome(page)
    page.screenshot(path=str(shots / f"{asset}.png"), full_page=True)
    return metadata.first


def dismiss_welcome(page) -> None:
    """Dagster greets a new browser with a newsletter dialog over the page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=3_000)
    except PlaywrightTimeout:  # no greeting this time
        return
    skip.click()


def metadata_row(page, name: str):
    """The metadata panel's row whose first cell is exactly `name`."""
    return page.locator("tr").filter(has=page.locator("td:first-child", has_text=name)).filter(
        has=page.get_by_text(name, exact=True)
    ).first


def open_markdown(page, name: str, shots: Path):
    """Click a markdown entry's [Show Markdown]; the dialog that shows it."""
    metadata_row(page, name).get_by_text("Show Markdown").click()
    dialog = page.get_by_role("dialog").filter(has_text=name).last
    dialog.wait_for()
    # Every picture in it has loaded (or failed to: naturalWidth 0).
    page.wait_for_function(
        "(names) => [...document.querySelectorAll('[role=dialog] img')].every((img) => img.complete)",
        arg=[name],
    )
    page.wait_for_timeout(1_000)  # the dialog's fade-in, for the screenshot
    page.screenshot(path=str(shots / f"{name}_dialog.png"), full_page=True)
    return dialog


def pictures(dialog) -> list[dict]:
    return dialog.locator("img").evaluate_all(
        "(imgs) => imgs.map((img) => ({alt: img.alt, natural: img.naturalWidth, shown: img.getBoundingClientRect().width,"
        " src: img.src.slice(0, 22)}))"
    )


def close(page, dialog) -> None:
    dialog.get_by_role("button", name="Close").click()
    dialog.wait_for(state="hidden")


def test_recscore_table_shows_the_scores_and_readable_previews(ui):
    url, page, shots = ui
    panel = open_partition(page, url, "recscore_table", shots)
    scores = metadata_row(page, "recscore").locator("table")
    headers = [h.strip() for h in scores.locator("th").all_inner_texts()]
    assert headers[:3] == ["step", "score", "fidelity"], headers
    assert "ash_ember_knights-000004.safetensors" in scores.inner_text()  # file names, not paths
    assert "artefacts/" not in scores.inner_text()
    assert "best_step" in panel.inner_text()

    dialog = open_markdown(page, "previews", shots)
    (picture,) = pictures(dialog)
    assert picture["src"].startswith("data:image/webp")
    # Loaded, with cells of the render's 128 px (a sheet of several per row), shown unscaled.
    assert picture["natural"] >= 4 * 128, picture
    assert picture["shown"] >= 0.95 * picture["natural"], picture
    close(page, dialog)


def test_chosen_model_shows_the_trigger_word_and_a_model_card_with_pictures(ui):
    url, page, shots = ui
    open_partition(page, url, "chosen_model", shots)
    assert metadata_row(page, "trigger_word").locator("td").nth(1).inner_text().strip() == "ash ek"

    dialog = open_markdown(page, "model_card", shots)
    assert "Trigger words" in dialog.inner_text() and "ash ek" in dialog.inner_text()
    shown = pictures(dialog)
    assert {p["alt"] for p in shown} == {"previews", "metrics"}, shown
    assert all(p["src"].startswith("data:image/") and p["natural"] >= 128 for p in shown), shown
    previews = next(p for p in shown if p["alt"] == "previews")
    assert previews["natural"] >= 4 * 128 and previews["shown"] >= 0.95 * previews["natural"], previews
    close(page, dialog)


def test_asset_tables_stay_narrow_enough_to_read(ui):
    url, page, shots = ui
    open_partition(page, url, "cleaned_crops", shots)
    crops = metadata_row(page, "crops").locator("table")
    headers = [h.strip() for h in crops.locator("th").all_inner_texts()]
    assert headers[:2] == ["kind", "site"] and headers[-1] == "crop_sha256", headers
    # A 10-character hash, not 64; the whole table is named by its path.
    first_hash = crops.locator("tr").nth(1).locator("td").last.inner_text().strip()
    assert len(first_hash) == 10, first_hash
    assert "tables/cleaned_crops/" in metadata_row(page, "crops_table_path").inner_text()

    open_partition(page, url, "matched_tags", shots)
    candidates = metadata_row(page, "candidates").locator("table")
    headers = [h.strip() for h in candidates.locator("th").all_inner_texts()]
    assert headers[:3] == ["site", "tag", "outcome"] and "evidence" not in headers, headers
    assert "name 'ash'" in metadata_row(page, "evidence").inner_text()

    # The metadata panel cuts off what is wider than the page: every table fits.
    too_wide = {}
    for asset in ("raw_scrape", "matched_tags", "cleaned_crops", "captions", "buckets", "lora_checkpoints",
                  "recscore_table"):
        open_partition(page, url, asset, shots)
        right = page.locator("table table").evaluate_all(
            "(tables) => Math.max(0, ...tables.map((t) => t.getBoundingClientRect().right))"
        )
        if right > page.viewport_size["width"]:
            too_wide[asset] = right
    assert not too_wide, too_wide


def test_checks_tab_shows_the_characters_partition(ui):
    url, page, shots = ui
    page.goto(f"{url}/assets/cleaned_crops?view=checks")
    latest = page.get_by_text("Latest execution")
    latest.wait_for()
    dismiss_welcome(page)
    page.get_by_text("Partition", exact=True).first.wait_for()
    page.screenshot(path=str(shots / "cleaned_crops_checks.png"), full_page=True)
    section = page.locator("body").inner_text()
    after = section[section.index("Latest execution"):]
    assert CHARACTER in after[: after.index("Metadata")], after[:400]
