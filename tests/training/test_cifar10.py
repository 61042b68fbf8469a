"""Real data anywhere: the CIFAR-10 archive is found or fetched through the Hub (a local HTTP Hub here,
serving a small dataset repo in the same format), checked by sha256, cached, and a missing one stops the
run with one line saying how to provide it."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from support import ROOT
from gqa_core.training.cifar10 import ARCHIVE_NAME, sha256_of
from support.hub_server import HubServer

SCRIPT = textwrap.dedent('''
    import json, sys
    from gqa_core.training.cifar10 import DatasetMissing, find_cifar10
    from gqa_core.training.data import build_datasets
    out = {}
    try:
        path = find_cifar10(sha256=sys.argv[1])
        out["path"] = str(path)
        splits = build_datasets(str(path), dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3))
        out["classes"] = splits.classes
        out["test"] = len(splits.test)
    except DatasetMissing as e:
        out["missing"] = str(e)
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope='module')
def small_archive(cifar_subset, tmp_path_factory):
    """A small archive in the project's format: train/<class>/*.jpg and test/<class>/*.jpg under one folder."""
    path = tmp_path_factory.mktemp('small') / ARCHIVE_NAME
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(cifar_subset / 'train', arcname='cifar10/train')
        tar.add(cifar_subset / 'test', arcname='cifar10/test')
    return path


def fetch(tmp_path, hub_root, sha256, offline=False, **env_extra):
    env = dict(os.environ, HF_HUB_OFFLINE='1' if offline else '0', HF_HOME=str(tmp_path / 'hf-home'),
               GQA_LENS_CACHE=str(tmp_path / 'cache'), GQA_LENS_CIFAR10_REPO='lens-data/cifar10-small',
               HF_HUB_DISABLE_XET='1', HF_TOKEN='hf_owner_secret')
    env.pop('GQA_LENS_CIFAR10', None)
    env.update(env_extra)
    with HubServer(hub_root) as hub:
        env['HF_ENDPOINT'] = hub.url
        proc = subprocess.run([sys.executable, '-c', SCRIPT, sha256], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        requests = list(hub.requests)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split('RESULT', 1)[1]), requests


def serve(tmp_path, archive_bytes):
    root = tmp_path / 'hub'
    repo = root / 'lens-data' / 'cifar10-small'
    repo.mkdir(parents=True)
    (repo / ARCHIVE_NAME).write_bytes(archive_bytes)
    return root


def test_fetched_through_the_hub_verified_and_cached(small_archive, tmp_path):
    sha = sha256_of(small_archive)
    root = serve(tmp_path, small_archive.read_bytes())
    out, requests = fetch(tmp_path, root, sha)
    assert out['path'] == str(tmp_path / 'cache' / 'datasets' / ARCHIVE_NAME), out
    assert sha256_of(tmp_path / 'cache' / 'datasets' / ARCHIVE_NAME) == sha
    assert len(out['classes']) == 10 and out['test'] == 200
    assert any('/datasets/lens-data/cifar10-small/resolve/' in path for path, _ in requests)
    assert all(auth is None for _, auth in requests), 'public data is fetched without the operator token'
    again, requests = fetch(tmp_path, root, sha, offline=True)
    assert again['path'] == out['path'] and requests == [], 'the second run reads the cache, offline'


def test_a_file_with_another_checksum_is_refused_and_not_kept(small_archive, tmp_path):
    root = serve(tmp_path, small_archive.read_bytes()[:-10] + b'tampered!!')
    out, _ = fetch(tmp_path, root, sha256_of(small_archive))
    assert 'has sha256' in out['missing'] and 'it was not kept' in out['missing'], out
    assert not (tmp_path / 'cache' / 'datasets' / ARCHIVE_NAME).exists()


def test_offline_with_no_copy_says_what_is_missing_and_how_to_provide_it(small_archive, tmp_path):
    out, _ = fetch(tmp_path, tmp_path, sha256_of(small_archive), offline=True)
    message = out['missing']
    assert message.startswith('CIFAR-10 (cifar10-jpeg.tar.gz') and 'GQA_LENS_CIFAR10=' in message, message
    assert '\n' not in message and len(message) < 500


def test_the_suite_stops_with_one_line_when_the_data_cannot_be_had(tmp_path):
    env = dict(os.environ, GQA_LENS_CIFAR10=str(tmp_path / 'nowhere.tar.gz'), HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           'tests/training/test_family.py::test_readme_accuracy_is_reproduced_by_the_eval_cli'],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if 'CIFAR-10 (cifar10-jpeg.tar.gz' in line]
    assert len(lines) == 1 and 'GQA_LENS_CIFAR10=' in lines[0] and 'nowhere.tar.gz is not a file' in lines[0], \
        proc.stdout[-2000:]
