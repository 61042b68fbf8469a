"""The tests' fixtures, for every folder below (shared helpers that are not fixtures: ``support``)."""
import os

from support import ALLOWED_MODELS, EXAMPLES_DIR, free_port

os.environ['GQA_LENS_MODEL_DIRS'] = str(ALLOWED_MODELS)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')

import pytest
import torch
import timm


@pytest.fixture(scope='session')
def vit_small():
    torch.manual_seed(0)
    return timm.create_model('vit_small_patch16_224').eval()


@pytest.fixture(scope='session')
def cifar10():
    """The verified CIFAR-10 archive: GQA_LENS_CIFAR10, the project's cache, ../shared/data, or fetched from
    the Hub (gqa_core.training.cifar10). With none to be had the run stops with one line saying how to provide it."""
    from gqa_core.training.cifar10 import DatasetMissing, find_cifar10
    try:
        return find_cifar10()
    except DatasetMissing as e:
        pytest.exit(str(e), returncode=1)


@pytest.fixture(scope='session')
def cifar_subset(tmp_path_factory, cifar10):
    """A real CIFAR-10 ImageFolder subset (60 train + 20 test images per class) cut from the archive."""
    import tarfile
    root = tmp_path_factory.mktemp('cifar-subset')
    counts = {}
    with tarfile.open(cifar10) as tar:
        for member in tar:
            parts = member.name.split('/')
            if not member.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            key = (split, cls)
            if counts.get(key, 0) >= (60 if split == 'train' else 20):
                continue
            counts[key] = counts.get(key, 0) + 1
            target = root / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    assert len([k for k in counts if k[0] == 'train']) == 10
    return root


@pytest.fixture(scope='session')
def registry():
    """The embedded model family (assets/models); GQA_LENS_MODELS may point elsewhere during development."""
    import os
    from gqa_core.lens.models import EMBEDDED_DIR, ModelRegistry
    reg = ModelRegistry(__import__('pathlib').Path(os.environ.get('GQA_LENS_MODELS', EMBEDDED_DIR)))
    assert reg.embedded(), 'the embedded models are missing from assets/models'
    return reg


@pytest.fixture(scope='session')
def analyses(registry):
    """Real recordings: every embedded model on a real CIFAR-10 test image."""
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.images import load_image
    image = load_image(str(EXAMPLES_DIR / 'cifar10_ship.jpg')).image
    return {spec: analyse(registry.get(spec), image, deep=True) for spec in registry.embedded()}


@pytest.fixture(scope='session')
def app_server():
    """The real app, served once on 127.0.0.1 for every HTTP and browser test: ``(url, app module)``."""
    import app
    port = free_port()
    app.demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f'http://127.0.0.1:{port}', app
    finally:
        app.demo.close()


def pytest_addoption(parser):
    parser.addoption('--update-screenshot', action='store_true',
                     help="rewrite the README's screenshot (docs/gqa-lens.png) from the browser test")
