"""The demo in a real browser: Debian's Chromium driven by Playwright (no browser download).

Loads the page, types a prompt, clicks Generate and waits for the three images and the
gate heatmaps, then runs the strength sweep; then opens the Text tab and continues a prompt
three ways. The screenshots are saved to ``outputs/test-artifacts/app.png`` and ``app_text.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from app_server import ROOT, running_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
# as root, without a display and with no network: the flags Chromium needs here
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it with apt)"
)


@pytest.mark.slow
def test_page_generates_three_images_and_gate_heatmaps(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    prompt = "a yellow banana on a gray background"
    with running_app(concurrency=2) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            box = page.locator("#prompt textarea")
            expect(box).to_be_visible(timeout=60_000)
            box.fill(prompt)
            page.locator("#generate").click()
            for elem in ("unsteered", "uniform", "dsas"):
                expect(page.locator(f"#{elem} img")).to_be_visible(timeout=120_000)
            gates = page.locator("#gates img")
            expect(gates.first).to_be_visible(timeout=60_000)
            assert gates.count() >= 2  # the mean over layers and at least one layer
            expect(page.locator("#scores")).to_contain_text("CLIP score")
            expect(page.locator("#scores")).to_contain_text("shapes-clip")
            # each image is the decoded PNG of this request, not a placeholder
            for elem in ("unsteered", "uniform", "dsas"):
                width = page.locator(f"#{elem} img").evaluate("img => img.complete ? img.naturalWidth : 0")
                assert width == 256
            # the strength sweep strip is one more click
            page.locator("#sweep").click()
            expect(page.locator("#sweep-strip img")).to_be_visible(timeout=120_000)
            assert page.locator(".toast-body.error").count() == 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for path in (tmp_path / "app.png", ARTIFACTS / "app.png"):
                page.screenshot(path=str(path), full_page=True)
            assert (ARTIFACTS / "app.png").stat().st_size > 20_000
            # the Text tab: shapes-lm continued three ways, tokens coloured by their gates
            page.get_by_role("tab", name="Text").click()
            page.locator("#text-generate").click()
            for elem in ("unsteered", "uniform", "dsas"):
                expect(page.locator(f"#text-{elem} .dsas-gates")).to_be_visible(timeout=120_000)
            expect(page.locator("#text-scores")).to_contain_text("perplexity")
            assert page.locator("#text-dsas .dsas-gates span[title^='gate']").count() > 5
            assert page.locator(".toast-body.error").count() == 0
            page.screenshot(path=str(ARTIFACTS / "app_text.png"), full_page=True)
            assert (ARTIFACTS / "app_text.png").stat().st_size > 20_000
        finally:
            browser.close()
