"""Helpers shared by several test modules."""

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def render_in_chromium(page: Path, tmp_path: Path) -> str:
    """The DOM after headless Chromium has loaded the page (the network is off: the page must need none)."""
    assert Path(CHROMIUM).exists(), "headless Chromium is needed: apt-get install chromium"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
