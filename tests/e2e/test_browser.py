"""What people see: the report card in Prefect's UI and the HTML report, in headless Chromium.

A real `prefect server start` with its UI, a recipe through the flow, then Chromium renders the
artifact page (its DOM must hold the card's numbers) and report.html. With
COMPRESS_SAVE_SCREENSHOTS=1 the two PNGs are copied to reports/screenshots/ (checked in).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import api, flow_runs, prefect_server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp: Path, url: str, *, screenshot: Path | None = None) -> str:
    """One headless Chromium call: a screenshot, or else the DOM after the page's scripts ran."""
    assert CHROMIUM
    out = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-quic", "--no-first-run",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,1800",
                        "--virtual-time-budget=15000", *out, url],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def png_stats(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the pixel data): no imaging library needed."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def assert_not_blank(path: Path) -> None:
    width, height, distinct = png_stats(path)
    assert (width, height) == (1400, 1800)
    assert path.stat().st_size > 20_000 and distinct > 40, (path, path.stat().st_size, distinct)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_card_in_the_prefect_ui_and_the_html_report(write_recipe, tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    reports = tmp_path / "reports"
    with prefect_server(home, PREFECT_UI_ENABLED="true") as (url, env):
        recipe = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}])
        r = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe),
                            "--reports-dir", str(reports)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        [run] = flow_runs(url, "compress-recipe")
        [art] = api(f"{url}/artifacts/filter",
                    {"artifacts": {"key": {"any_": ["tiny-report-card"]},
                                   "flow_run_id": {"any_": [run["id"]]}},
                     "limit": 1, "sort": "CREATED_DESC"})
        rows = json.loads(art["data"]) if isinstance(art["data"], str) else art["data"]
        export_row = rows[-1]
        assert export_row["stage"] == "export"

        # The artifact's own page renders the table (the run's Artifacts tab lists cards only).
        page = f"{url.removesuffix('/api')}/artifacts/artifact/{art['id']}"
        dom = chromium(tmp_path, page)
        assert "Can't connect to Server API" not in dom
        [col] = [k for k in export_row if k.startswith("p50 b1 ms @") and "speed-up" in k]
        for text in (art["description"], col, export_row["params"], export_row[col],
                     run["name"]):
            assert text in dom, text
        ui_png = tmp_path / "prefect-ui-report-card.png"
        chromium(tmp_path, page, screenshot=ui_png)

    [folder] = [p for p in (reports / "tiny").iterdir()
                if p.name != "latest" and not p.name.startswith(".")]  # .lock
    html_png = tmp_path / "report-html.png"
    chromium(tmp_path, (folder / "report.html").as_uri(), screenshot=html_png)
    html_dom = chromium(tmp_path, (folder / "report.html").as_uri())
    assert "export" in html_dom and "<svg" in html_dom
    for png in (ui_png, html_png):
        assert_not_blank(png)
    if os.environ.get("COMPRESS_SAVE_SCREENSHOTS") == "1":
        shots = ROOT / "reports" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        for png in (ui_png, html_png):
            shutil.copyfile(png, shots / png.name)
