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


def open_with_image(p, app_url, image):
    """Chromium on the app with ``image`` uploaded: ``(browser, page)``."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(viewport={'width': 1600, 'height': 1200})
    page.goto(app_url)
    page.locator('#image input[type=file]').set_input_files(str(image))
    return browser, page


def coloured_fraction(png: bytes) -> float:
    """The share of a screenshot's pixels that are coloured (not white, grey or black): an empty frame and its
    grey label text have none, a drawn heatmap or bar chart many."""
    import io
    import numpy as np
    from PIL import Image
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    return float(((rgb.max(-1) - rgb.min(-1)) > 40).mean())


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
        browser, page = open_with_image(p, app_url, image)
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
        width, height, complete = page.locator('#overlay-0 img').evaluate(
            'img => [img.naturalWidth, img.naturalHeight, img.complete]')
        assert complete and width > 0 and height > 0, 'the attention overlay image loaded in the page'
        for elem in ('assign-0', 'keynorm-0', 'grid-0'):
            drawn = coloured_fraction(page.locator(f'#{elem} .js-plotly-plot').screenshot())
            assert drawn > 0.05, f'{elem}: {drawn:.1%} of it is coloured, as the browser shows it: an empty frame?'
        # a bad upload: a message, and the page keeps working
        bad = tmp_path / 'notes.png'
        bad.write_text('not an image')
        page.locator('#image input[type=file]').set_input_files(str(bad))
        page.locator('#run').click()
        expect(page.locator('#status')).to_contain_text('not an image file', timeout=30_000)
        browser.close()


def _table_rows(page, elem_id, columns):
    """The cell texts of a gradio Dataframe as the page shows them, row by row (headers dropped)."""
    cells = [t.strip() for t in page.locator(f'#{elem_id}').inner_text().split('\n') if t.strip()]
    body = cells[columns:]
    return [body[i:i + columns] for i in range(0, len(body) - columns + 1, columns)]


def test_heads_panels_and_dataset_tabs_show_the_apis_numbers(app_url, tmp_path):
    import json
    from playwright.sync_api import expect, sync_playwright
    from conftest import ROOT
    client = Client(app_url, verbose=False)
    image = EXAMPLES_DIR / 'cifar10_dog.jpg'
    out = client.predict(handle_file(str(image)), 'embedded/kdgqa', '(none)', '(none)', '(none)', 0, 'mean', 'mean',
                         'zero', True, api_name='/run')
    from gqa_core.lens.views import PANELS
    faith = json.loads(out[2 + PANELS.index('faithfulness')]['plot'])
    expected_legend = faith['data'][0]['name']  # e.g. "class token map: deletion AUC 0.412"
    live_plot, live_table = client.predict('embedded/mha', 8, api_name='/kv_budget')
    shipped_kvb = json.loads((ROOT / 'assets' / 'analysis' / 'kv-budget' / 'kv_budget.json').read_text())
    shipped_stats = json.loads((ROOT / 'assets' / 'analysis' / 'dataset' / 'stats.json').read_text())
    with sync_playwright() as p:
        browser, page = open_with_image(p, app_url, image)
        choose(page, 0, 'embedded/kdgqa')
        for slot in (1, 2, 3):
            choose(page, slot, '(none)')
        page.locator('#deep input[type=checkbox]').check()
        page.locator('#run').click()
        for elem in ('ablation-0', 'diversity-0', 'faith-0', 'keynorm-0'):
            expect(page.locator(f'#{elem} .js-plotly-plot')).to_be_visible(timeout=60_000)
        expect(page.locator('#faith-0 .legendtext').first).to_have_text(expected_legend, timeout=30_000)

        page.get_by_role('tab', name='KV budget').click()
        expect(page.locator('#kvb-shipped-plot .js-plotly-plot')).to_be_visible(timeout=30_000)
        rows = _table_rows(page, 'kvb-shipped-table', 6)
        wanted = next(r for r in shipped_kvb['rows'] if r['num_kv_heads'] == 4 and r['variant'] == 'gqa'
                      and r['grouping'] == 'output-error')
        row = next(r for r in rows if r[:3] == ['4', 'gqa', 'output-error'])
        assert float(row[4]) == pytest.approx(100 * wanted['top1'], abs=0.01)
        page.locator('#kvb-n input[type=number]').fill('8')
        page.locator('#kvb-n input[type=number]').press('Enter')
        page.locator('#kvb-run').click()
        expect(page.locator('#kvb-live-plot .js-plotly-plot')).to_be_visible(timeout=120_000)
        expect(page.locator('#kvb-live-table')).to_contain_text('output-error', timeout=120_000)
        live_rows = _table_rows(page, 'kvb-live-table', 6)
        assert [float(r[5]) for r in live_rows] == [float(r[5]) for r in live_table['data']]

        page.get_by_role('tab', name='Dataset view').click()
        expect(page.locator('#dataset-plot-0 .js-plotly-plot')).to_be_visible(timeout=30_000)
        rows = _table_rows(page, 'dataset-table', 5)
        kd = next(r for r in rows if r[0] == 'kdgqa')
        assert float(kd[1]) == pytest.approx(100 * shipped_stats['models']['kdgqa']['top1'], abs=0.01)
        page.screenshot(path=str(Path(os.environ.get('GQA_LENS_SCREENSHOTS', tmp_path)) / 'dataset-view.png'),
                        full_page=True)
        browser.close()


def test_exported_html_figures_render_with_the_network_off(app_url, tmp_path):
    """The zip's HTML figures load plotly.js from the zip itself: opened from disk with every request outside
    the unpacked folder blocked, they still draw, and none was even attempted."""
    import zipfile
    from playwright.sync_api import sync_playwright
    client = Client(app_url, verbose=False)
    client.predict(*[handle_file(str(EXAMPLES_DIR / 'cifar10_ship.jpg')), 'embedded/kdgqa', 'embedded/mha', '(none)',
                     '(none)', 0, 'mean', 'mean', 'zero', False], api_name='/run')
    archive = client.predict(0, 'mean', 'mean', api_name='/export')
    folder = tmp_path / 'unzipped'
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(folder)
    pages = sorted(folder.glob('*/assignment.html')) + sorted(folder.glob('*/key_norms.html'))
    assert len(pages) == 4
    outside = []

    def only_the_zip(route):
        url = route.request.url
        if url.startswith(folder.as_uri()):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={'width': 900, 'height': 700})
        page.route('**/*', only_the_zip)
        for html in pages:
            page.goto(html.as_uri())
            page.wait_for_selector('.js-plotly-plot .main-svg', timeout=15_000)
            drawn = coloured_fraction(page.locator('.js-plotly-plot').first.screenshot())
            assert drawn > 0.05, (html.relative_to(folder), drawn)
        browser.close()
    assert outside == [], f'the exported figures asked the network for {outside}'
    assert (folder / 'plotly.min.js').is_file()
