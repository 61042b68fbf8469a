"""The ZeroGPU path: the GPU functions take and return plain picklable data, so running them in a spawned
process with pickled arguments -- what ZeroGPU does -- gives bit-identical results to the in-process call;
with ``spaces`` installed and no ZeroGPU the decorator changes nothing and the app serves as usual."""
import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file

from support import EXAMPLES_DIR
from gqa_core.lens import gpu
from gqa_core.lens.analysis import model_input
from gqa_core.lens.calibration import calibration_images
from gqa_core.lens.images import load_image
from gqa_core.lens.kv_budget import kv_budget_rows


def in_a_spawned_process(fn, job):
    """Pickle ``job``, run ``fn`` on it in a fresh interpreter (spawn, as ZeroGPU's worker is), unpickle."""
    payload = pickle.dumps(job)
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pickle.loads(pool.apply(_run_pickled, (fn.__module__, fn.__name__, payload)))


def _run_pickled(module, name, payload):
    import importlib
    torch.set_num_threads(2)
    return pickle.dumps(getattr(importlib.import_module(module), name)(pickle.loads(payload)))


def assert_same(a, b, where='result'):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=True), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    elif hasattr(a, '__dataclass_fields__'):
        for k in a.__dataclass_fields__:
            assert_same(getattr(a, k), getattr(b, k), f'{where}.{k}')
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize('spec', ['embedded/kdgqa', 'embedded/dgqa-ema'])
def test_analysis_forwards_in_a_spawned_process_are_bit_identical(registry, spec):
    loaded = registry.get(spec)
    _, x = model_input(loaded, load_image(str(EXAMPLES_DIR / 'cifar10_ship.jpg')).image)
    torch.set_num_threads(2)
    here = gpu.run_forwards(loaded.model, x, True, loaded.labels)
    there = in_a_spawned_process(gpu.forwards_in_a_gpu_call, gpu.ForwardJob.of(loaded.config, loaded.model, x, True, loaded.labels))
    assert here.ablation is not None and here.faithfulness
    assert_same(here, there)


def test_live_kv_budget_in_a_spawned_process_is_identical(registry):
    loaded = registry.get('embedded/mha')
    images = calibration_images(loaded.preprocessing, 24)
    labels = torch.arange(16) % 10
    torch.set_num_threads(2)
    here = kv_budget_rows(loaded.model, images[8:], labels, images[:8], batch_size=64, max_refine_flops=1e10)
    there = in_a_spawned_process(gpu.kv_budget_in_a_gpu_call,
                                 gpu.KVBudgetJob.of(loaded.config, loaded.model, images[8:], labels, images[:8], 1e10))
    assert_same(here, there)


def test_with_spaces_installed_and_no_zerogpu_nothing_changes(app_server):
    import spaces  # a test dependency (requirements-dev.txt); the ZeroGPU Space has it preinstalled
    assert not spaces.config.Config.zero_gpu and not gpu.on_zerogpu()
    assert not hasattr(gpu.forwards_in_a_gpu_call, 'zerogpu'), 'the decorator returned the function itself'
    got = Client(app_server[0], verbose=False).predict(handle_file(str(EXAMPLES_DIR / 'cifar10_dog.jpg')),
                                                       'embedded/kdgqa', api_name='/predict')
    assert len(got) == 5
