"""Headless Chromium for UI tests and README screenshots: `dump_dom(url)` and `screenshot(url, path)`.

Chromium's own command line is enough here (no driver, no pip dependency): `--virtual-time-budget` lets
the page's scripts run and its requests finish before the DOM is dumped or the picture taken. Virtual
time stands still while requests are pending, so a slow server does not eat the budget; a page that is
still incomplete is loaded again with a larger budget.

    from tests._chromium import screenshot        # or `from _chromium import screenshot` inside tests/
    screenshot("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning", "docs/ui.png")
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium")
WINDOW = (1600, 1000)
BUDGETS_MS = (6000, 20000)
TIMEOUT_S = 90


def _run(url: str, extra: list[str], budget_ms: int, window: tuple[int, int]) -> str:
    if CHROMIUM is None:
        raise RuntimeError("chromium not found on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="ltsearch-chromium-") as profile:  # a fresh profile: no state from earlier runs
        result = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-proxy-server",
                                 f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}", "--hide-scrollbars",
                                 f"--virtual-time-budget={budget_ms}", *extra, url],
                                capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode} on {url}: {result.stderr[-2000:]}")
    return result.stdout


def dump_dom(url: str, *, expect: tuple[str, ...] = (), screenshot_path: str | Path | None = None,
             window: tuple[int, int] = WINDOW) -> str:
    """The DOM after the page's scripts ran; loaded again with a larger budget until every `expect` text is in it."""
    extra = ["--dump-dom"] + ([f"--screenshot={screenshot_path}"] if screenshot_path else [])
    dom = ""
    for budget in BUDGETS_MS:
        dom = _run(url, extra, budget, window)
        if all(text in dom for text in expect):
            break
    return dom


def screenshot(url: str, path: str | Path, *, window: tuple[int, int] = WINDOW, budget_ms: int = BUDGETS_MS[-1]) -> Path:
    """A PNG of the page as a 1600x1000 browser window shows it, once its data has loaded."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, [f"--screenshot={path}"], budget_ms, window)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}")
    return path
