"""End to end in a real browser: headless Debian chromium driven by Playwright."""
import os
import re
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from conftest import EXAMPLES_DIR

CHROMIUM = '/usr/bin/chromium'
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']


@pytest.fixture(scope='module')
def app_url(app_server):
    return app_server[0]


def choose(page, slot: int, value: str) -> None:
    box = page.locator(f'#model-{slot} input')
    box.click()
    box.fill(value)
    box.press('Enter')
    page.locator('h1').first.click()  # blur: gradio commits a custom value on blur


def test_upload_run_two_models_and_read_the_page(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    assert os.path.exists(CHROMIUM), 'install Debian chromium (.ci/run does)'
    image = EXAMPLES_DIR / 'cifar10_ship.jpg'
    expected = Client(app_url, verbose=False).predict(handle_file(str(image)), 'embedded/kdgqa', api_name='/predict')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={'width': 1600, 'height': 1200})
        page.goto(app_url)
        page.locator('#image input[type=file]').set_input_files(str(image))
        choose(page, 0, 'embedded/kdgqa')
        choose(page, 1, 'embedded/mha')
        choose(page, 2, '(none)')
        choose(page, 3, '(none)')
        page.locator('#run').click()
        expect(page.locator('#overlay-0 img')).to_be_visible(timeout=60_000)
        for elem in ('assign-0', 'keynorm-0', 'grid-0', 'assign-1', 'diff-0'):
            expect(page.locator(f'#{elem} .js-plotly-plot')).to_be_visible(timeout=60_000)
        expect(page.locator('#summary-0')).to_contain_text('KDGQA')
        expect(page.locator('#summary-2')).to_have_text(re.compile(r'^\s*$'))
        top_label = page.locator('#top5-0 h2').first.inner_text().strip()
        assert top_label == next(iter(expected)), (top_label, expected)
        shot = Path(os.environ.get('GQA_LENS_SCREENSHOTS', tmp_path)) / 'gqa-lens.png'
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        # a bad upload: a message, and the page keeps working
        bad = tmp_path / 'notes.png'
        bad.write_text('not an image')
        page.locator('#image input[type=file]').set_input_files(str(bad))
        page.locator('#run').click()
        expect(page.locator('#status')).to_contain_text('not an image file', timeout=30_000)
        browser.close()
