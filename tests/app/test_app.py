"""The app over real HTTP: named API endpoints, bad input, concurrency and determinism."""
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client, handle_file

from support.bad_images import ACCEPTED, REJECTED, write_all
from support import EXAMPLES_DIR
from support.answers import columns, unwrap


@pytest.fixture(scope='module')
def server(app_server):
    return app_server


@pytest.fixture(scope='module')
def client(server):
    return Client(server[0], verbose=False)


def run_args(image, *models, view='attention', layer=0, head='mean', fusion='mean', mode='zero', deep=True):
    models = list(models) + [''] * (4 - len(models))
    return [handle_file(str(image)), *models, view, layer, head, fusion, mode, deep]


def test_named_endpoints_exist(client):
    assert {'/run', '/predict', '/export'} <= set(client.view_api(return_format='dict')['named_endpoints'])


def test_predict_endpoint_matches_in_process_analysis(client, server):
    app = server[1]
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.images import load_image
    image = EXAMPLES_DIR / 'cifar10_ship.jpg'
    expected = analyse(app.lens.registry.get('embedded/kdgqa'), load_image(str(image)).image).top5
    got = client.predict(handle_file(str(image)), 'embedded/kdgqa', api_name='/predict')
    assert list(got) == [label for label, _ in expected]
    assert list(got.values()) == [p for _, p in expected]


def test_run_endpoint_returns_every_panel_for_four_models(client, server):
    specs = server[1].lens.registry.embedded()[:4]
    out = client.predict(*run_args(EXAMPLES_DIR / 'grace_hopper.jpg', *specs, layer=3), api_name='/run')
    status, layer_update, head_update = out[0], out[1], out[2]
    from gqa_core.lens.images import load_image
    assert status == ('; '.join(load_image(str(EXAMPLES_DIR / 'grace_hopper.jpg')).notes) or 'done'), status
    assert layer_update['value'] == 3 and layer_update['maximum'] == 5, 'the slider follows the six-layer models'
    assert head_update['choices'] == [['mean', 'mean']] + [[str(h), str(h)] for h in range(8)], head_update
    import numpy as np
    from PIL import Image
    for spec, col in zip(specs, columns(out)):
        assert spec in col['summary'] and 'params' in col['summary']
        assert len(col['top5']['confidences']) == 5
        assert os.path.isfile(col['picture']) and col['figure'] is None, 'the attention view is a picture'
        assert 'class token attention, layer 3' in col['caption'], col['caption']
        # honest about the models: what they know, what they saw, and that the photo was shrunk for them
        assert 'trained on **CIFAR-10** · 10 classes · sees 32 × 32 px' in col['summary'], col['summary']
        assert 'the 512 × 600 image was shrunk to 32 × 32 px for this model' in col['summary'], col['summary']
        seen = np.asarray(Image.open(col['seen']))
        assert seen.shape == (128, 128, 3), 'the 32 px input, each pixel shown as a 4 x 4 block'
        assert np.array_equal(seen, np.repeat(np.repeat(seen[::4, ::4], 4, 0), 4, 1))


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp('bad'), EXAMPLES_DIR / 'cifar10_cat.jpg')


@pytest.mark.parametrize('kind', sorted(REJECTED) + sorted(ACCEPTED))
def test_bad_images_get_a_message_and_the_app_keeps_serving(client, bad_files, kind):
    out = client.predict(*run_args(bad_files[kind], 'embedded/mha'), api_name='/run')
    expected = REJECTED.get(kind) or ACCEPTED[kind]
    assert expected in out[0], out[0]
    assert '\n' not in out[0], 'one line'
    assert (not columns(out)[0]['top5']) == (kind in REJECTED), 'no prediction for rejected files, one for accepted ones'
    # still serving
    ok = client.predict(handle_file(str(EXAMPLES_DIR / 'cifar10_dog.jpg')), 'embedded/mha', api_name='/predict')
    assert len(ok) == 5


def test_unknown_repo_and_invalid_g_name_the_problem(client):
    out = client.predict(*run_args(EXAMPLES_DIR / 'cifar10_cat.jpg', 'embedded/mha', 'hub:nobody/no-such-model',
                                   'convert:embedded/mha:gqa:3', 'convert:embedded/mha:kdgqa:2'), api_name='/run')
    status = out[0]
    assert 'nobody/no-such-model' in status and 'num_kv_heads=3 must be a positive divisor of the 8 heads' in status
    cols = columns(out)
    assert 'MHA' in cols[0]['summary'] and 'KDGQA, G = 2' in cols[3]['summary'], 'the good models still ran'
    assert 'nobody/no-such-model' in cols[1]['summary'], 'the failed column says why'
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match='unknown model spec'):
        client.predict(handle_file(str(EXAMPLES_DIR / 'cifar10_cat.jpg')), 'resnet50', api_name='/predict')


def test_concurrent_clients_get_the_single_client_answer(server):
    url = server[0]
    images = sorted(EXAMPLES_DIR.glob('cifar10_*.jpg'))[:5]
    specs = server[1].lens.registry.embedded()
    jobs = [(images[(c + r) % 5], specs[(c * 5 + r) % len(specs)]) for c in range(16) for r in range(5)]
    single = Client(url, verbose=False)
    expected = {(img, spec): single.predict(handle_file(str(img)), spec, api_name='/predict')
                for img, spec in set(jobs)}

    def one_client(c):
        client = Client(url, verbose=False)
        results = []
        for img, spec in jobs[c * 5:(c + 1) * 5]:
            start = time.perf_counter()
            results.append((img, spec, client.predict(handle_file(str(img)), spec, api_name='/predict'),
                            time.perf_counter() - start))
        return results

    with ThreadPoolExecutor(16) as pool:
        results = [r for batch in pool.map(one_client, range(16)) for r in batch]
    assert len(results) == 80
    mismatches = [(img.name, spec) for img, spec, got, _ in results if got != expected[(img, spec)]]
    assert not mismatches
    latencies = sorted(t for *_, t in results)
    print(f'\n16 clients x 5 requests: p50 {statistics.median(latencies) * 1000:.0f} ms, '
          f'p95 {latencies[int(0.95 * len(latencies)) - 1] * 1000:.0f} ms')


def test_export_endpoint_writes_a_zip(client):
    client.predict(*run_args(EXAMPLES_DIR / 'cifar10_frog.jpg', 'embedded/mha', 'embedded/kdgqa'), api_name='/run')
    # /export reads the session state of the same client
    path = unwrap(client.predict(0, 'mean', 'mean', api_name='/export'))
    import zipfile
    with zipfile.ZipFile(path) as zf:
        assert any(n.endswith('arrays.npz') for n in zf.namelist())


def _column_outputs(out):
    """(summary, top-5 labels and confidences, picture bytes, seen bytes) of each of the four columns."""
    result = []
    for col in columns(out):
        summary, top5 = col['summary'], col['top5']
        images = []
        for path in (col['picture'], col['seen']):
            data = open(path, 'rb').read()
            assert len(data) > 0, 'a returned image is empty'
            from PIL import Image
            import io
            Image.open(io.BytesIO(data)).load()  # a whole, decodable PNG
            images.append(data)
        result.append((summary, [(c['label'], c['confidence']) for c in top5['confidences']], *images))
    return result


@pytest.mark.slow
def test_sixteen_concurrent_clients_same_image_four_models(server):
    """Identical images from many sessions never share a file: 0 errors, no empty image, same answers."""
    url = server[0]
    specs = server[1].lens.registry.embedded()[:4]
    image = EXAMPLES_DIR / 'cifar10_horse.jpg'
    expected = _column_outputs(Client(url, verbose=False).predict(*run_args(image, *specs, layer=2), api_name='/run'))

    def one_client(c):
        # 32 queued /runs on 2 cores: an upload may wait longer than httpx's 5 s default; latency is benchmarked
        # (bench/bench_app.py), this test is about what comes back
        client = Client(url, verbose=False, httpx_kwargs={'timeout': 120})
        return [_column_outputs(client.predict(*run_args(image, *specs, layer=2), api_name='/run')) for _ in range(2)]

    with ThreadPoolExecutor(16) as pool:
        results = [r for batch in pool.map(one_client, range(16)) for r in batch]
    assert len(results) == 32
    assert all(r == expected for r in results)


def test_closed_and_idle_sessions_free_their_state_and_files(server):
    import datetime
    from gradio_client.exceptions import AppError
    app = server[1]
    client = Client(server[0], verbose=False)
    client.predict(*run_args(EXAMPLES_DIR / 'cifar10_frog.jpg', 'embedded/mha'), api_name='/run')
    path = unwrap(client.predict(0, 'mean', 'mean', api_name='/export'))
    assert os.path.isfile(path)
    assert app.lens.reaper.sessions() >= 1 and app.lens.files.count() >= 1
    later = datetime.datetime.now() + datetime.timedelta(seconds=app.lens.settings.session_ttl + 1)
    holder = app.lens.demo.state_holder
    before = (len(holder.session_data), len(holder.time_last_used))
    assert app.lens.reaper.reap(now=later) >= 1, before
    mine = client.session_hash
    assert mine not in holder.session_data and mine not in holder.time_last_used, 'this idle session is gone'
    # every other idle session went too; a client still connected (this module's shared one) may open a new
    # session at once through its heartbeat, so at most one is back
    assert app.lens.reaper.sessions() <= 1, ('every idle session is gone, with gradio’s per-session copies', before,
                                             sorted(holder.session_data), sorted(holder.time_last_used))
    with pytest.raises(AppError, match='run the models on an image first'):
        client.predict(0, 'mean', 'mean', api_name='/export')  # its results went with the session
    app.lens.files.sweep(now=time.time() + app.lens.files.ttl + 1)
    assert app.lens.files.count() == 0, ('overlays and exports are deleted once old', app.lens.files.count())


def test_pick_endpoint_maps_one_place_into_every_model_and_refuses_bad_input(server):
    from gradio_client.exceptions import AppError
    stale = Client(server[0], verbose=False)
    with pytest.raises(AppError, match='no results in this session: call /run first'):
        stale.predict('0.5, 0.5', 1, api_name='/pick')
    client = Client(server[0], verbose=False)
    specs = ['embedded/mha', 'embedded/kdgqa']
    client.predict(*run_args(EXAMPLES_DIR / 'cifar10_ship.jpg', *specs, deep=False), api_name='/run')
    got = client.predict('0.99, 0.01', 2, api_name='/pick')
    assert [m['spec'] for m in got['models']] == specs
    for model in got['models']:
        assert model['grid'] == [8, 8] and model['layer'] == 2
        assert model['picked'] == [dict(token=1 + 7, row=0, col=7, label='patch (row 0, column 7)')]
        assert len(model['rows']) == 8 and len(model['rows'][0]) == 64 and len(model['columns'][0]) == 64
        assert len(model['query_to_kv']) == 8 and len(model['key_norms'][0]) == 64
    assert client.predict('class token', 0, api_name='/pick')['models'][0]['picked'][0]['token'] == 0
    several = client.predict('0.99, 0.01; 0.01, 0.99', 0, api_name='/pick')['models'][1]['picked']
    assert [(p['row'], p['col']) for p in several] == [(0, 7), (7, 0)]
    for query, layer, message in (('1.5, 0.2', 0, 'x must be a number 0..1'), ('0.2, -1', 0, 'y must be'),
                                  ('left, top', 0, 'x must be a number'), ('0.5, 0.5', 99, 'layer 99 does not exist'),
                                  ('0.5, 0.5', -1, 'layer must be an integer from 0'),
                                  ('register 3', 0, "no 'register 3' token"), ('x' * 5000, 0, 'query is 401 characters'),
                                  ('; '.join(['0.5, 0.5'] * 17), 0, 'at most 16 at once')):
        with pytest.raises(AppError, match=message):
            client.predict(query, layer, api_name='/pick')
    assert client.predict('0.5, 0.5', 1, api_name='/pick')['models'], 'still serving after the refusals'
