"""The command-line tools read a Hugging Face dataset repo -- map-style and streamed, one process and two -- served
by the local HTTP Hub (tests/support/hub_server.py), and count exactly what they count on the same images in
a folder."""
import json
import shutil

import pytest

from support import ROOT
from support.hub_server import HubServer
from support.launch import run_tool

REPO = ('tiny', 'cifar10')
TEST_IMAGES, TRAIN_IMAGES = 61, 40  # 61: odd, so two processes hold parts of different sizes
KDGQA = str(ROOT / 'assets' / 'models' / 'kdgqa')


@pytest.fixture(scope='module')
def hub_dataset(tmp_path_factory, cifar_subset):
    """``(hub root, folder)``: the same real CIFAR-10 JPEGs as a dataset repo of two parquet files (an image and
    a class-label column; the JPEG bytes as stored, so both decode the same pixels) and as an ImageFolder."""
    datasets = pytest.importorskip('datasets')
    root = tmp_path_factory.mktemp('hub')
    folder = tmp_path_factory.mktemp('folder')
    classes = sorted(p.name for p in (cifar_subset / 'train').iterdir())
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
    for split, count in (('test', TEST_IMAGES), ('train', TRAIN_IMAGES)):
        files = sorted((cifar_subset / split).glob('*/*.jpg'), key=lambda p: (p.stem, p.parent.name))[:count]
        rows = dict(image=[{'bytes': f.read_bytes(), 'path': None} for f in files],
                    label=[classes.index(f.parent.name) for f in files])
        target = root / REPO[0] / REPO[1] / 'data' / f'{split}-00000-of-00001.parquet'
        target.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(target))
        for f in files:
            (folder / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, folder / split / f.parent.name / f.name)
    return root, folder


def evaluate_json(tmp_path, name, data, processes, *extra, env=None):
    out = tmp_path / f'{name}.json'
    run_tool(['gqa_core.evaluate', KDGQA, '--data', data, '--batch-size', '16', '--device', 'cpu',
              '--json', str(out), *extra], processes, env=env)
    return json.loads(out.read_text())


def counted(result):
    return {k: result[k] for k in ('n', 'top1', 'top5', 'per_class', 'mean_allocation')}


def test_evaluate_reads_a_hub_dataset_map_style_and_streamed(tmp_path, hub_dataset):
    root, folder = hub_dataset
    from_folder = evaluate_json(tmp_path, 'folder', str(folder), 1)
    assert from_folder['n'] == TEST_IMAGES
    with HubServer(root) as server:
        env = dict(HF_ENDPOINT=server.url, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf-home'),
                   HF_HUB_DISABLE_XET='1')
        repo = '/'.join(REPO)
        results = {
            'map, 1': evaluate_json(tmp_path, 'map1', repo, 1, env=env),
            'map, 2': evaluate_json(tmp_path, 'map2', repo, 2, env=env),
            'streamed, 1': evaluate_json(tmp_path, 'stream1', repo, 1, '--streaming', env=env),
            'streamed, 2': evaluate_json(tmp_path, 'stream2', repo, 2, '--streaming', env=env),
        }
        assert any('/api/datasets/tiny/cifar10' in path for path, _ in server.requests)
    for how, result in results.items():
        assert result['processes'] == int(how[-1]), how
        assert counted(result) == counted(from_folder), how


def test_stats_and_kv_budget_stream_a_hub_dataset_in_two_processes(tmp_path, hub_dataset):
    """Each process streams its rows (split_dataset_by_node); the figures are those of one process reading the
    folder. kv_budget's calibration images come from the streamed train split (its first rows)."""
    root, folder = hub_dataset
    stats_args = [KDGQA, str(ROOT / 'assets' / 'models' / 'gqa'), '--no-html', '--device', 'cpu']
    run_tool(['gqa_core.stats', *stats_args, '--data', str(folder), '--out', str(tmp_path / 'folder')], 1)
    with HubServer(root) as server:
        env = dict(HF_ENDPOINT=server.url, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf-home'),
                   HF_HUB_DISABLE_XET='1')
        run_tool(['gqa_core.stats', *stats_args, '--data', '/'.join(REPO), '--streaming',
                  '--out', str(tmp_path / 'streamed')], 2, env=env)
        run_tool(['gqa_core.kv_budget', str(ROOT / 'assets' / 'models' / 'mha'), '--data', '/'.join(REPO),
                  '--streaming', '--calibration-images', '16', '--device', 'cpu', '--out', str(tmp_path / 'kv')],
                 2, env=env)
    folder_stats = json.loads((tmp_path / 'folder' / 'stats.json').read_text())
    streamed = json.loads((tmp_path / 'streamed' / 'stats.json').read_text())
    assert (folder_stats.pop('processes'), streamed.pop('processes')) == (1, 2)
    folder_stats.pop('data'), streamed.pop('data')
    assert streamed == folder_stats
    kv = json.loads((tmp_path / 'kv' / 'kv_budget.json').read_text())
    assert kv['n'] == TEST_IMAGES and kv['processes'] == 2 and kv['calibration_images'] == 16
    assert kv['rows'][0]['variant'] == 'mha' and kv['rows'][0]['top1'] > 0.5
