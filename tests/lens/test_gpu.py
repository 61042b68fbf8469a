"""The ZeroGPU path: the GPU functions take and return plain picklable data, so running them in a spawned
process with pickled arguments -- what ZeroGPU does -- gives bit-identical results to the in-process call, and
the seconds each call reserves follow from those same arguments alone (the forwards they count are the forwards
that run); with ``spaces`` installed and no ZeroGPU the decorator changes nothing and the app serves as usual."""
import multiprocessing
import pickle

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file

from support import EXAMPLES_DIR
from gqa_core.lens import gpu
from gqa_core.lens.gpu_duration import MAX_GPU_SECONDS, MIN_GPU_SECONDS, analysis_forwards, gpu_seconds
from gqa_core.lens.analysis import model_input
from gqa_core.lens.calibration import calibration_images
from gqa_core.lens.images import load_image
from gqa_core.lens.kv_budget import kv_budget_rows


def in_a_spawned_process(fn, job):
    """Pickle ``job``, and in a fresh interpreter (spawn, as ZeroGPU's worker is) ask ``fn`` the seconds it
    reserves for it and run it on it: ``(seconds, result)``, unpickled."""
    payload = pickle.dumps(job)
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pickle.loads(pool.apply(_run_pickled, (fn.__module__, fn.__name__, payload)))


def _run_pickled(module, name, payload):
    import importlib
    torch.set_num_threads(2)
    fn, job = getattr(importlib.import_module(module), name), pickle.loads(payload)
    return pickle.dumps((fn.gpu_seconds(job), fn(job)))


class RowsThroughBlocks:
    """Counts the image rows that pass through every block of a model (and of its deep copies): the work a GPU
    call does, in single-image forwards x layers."""

    def __init__(self, model):
        self.rows = 0
        self.handles = [block.register_forward_pre_hook(self.count) for block in model.blocks]

    def count(self, block, args):
        self.rows += int(args[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


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
    job = gpu.ForwardJob.of(loaded.config, loaded.model, x, True, loaded.labels)
    with RowsThroughBlocks(loaded.model) as work:
        here = gpu.run_forwards(loaded.model, x, True, loaded.labels)
    seconds, there = in_a_spawned_process(gpu.forwards_in_a_gpu_call, job)
    assert here.ablation is not None and here.faithfulness
    assert_same(here, there)
    assert work.rows == round(job.forwards * job.layers), 'the job counts the forwards that run'
    assert seconds == gpu.forwards_in_a_gpu_call.gpu_seconds(job) == gpu_seconds(job.tokens, job.layers, job.forwards)


def test_live_kv_budget_in_a_spawned_process_is_identical(registry):
    loaded = registry.get('embedded/mha')
    images = calibration_images(loaded.preprocessing, 24)
    labels = torch.arange(16) % 10
    torch.set_num_threads(2)
    job = gpu.KVBudgetJob.of(loaded.config, loaded.model, images[8:], labels, images[:8], 1e10)
    with RowsThroughBlocks(loaded.model) as work:  # the converted models are deep copies: counted too
        here = kv_budget_rows(loaded.model, images[8:], labels, images[:8], batch_size=64, max_refine_flops=1e10)
    seconds, there = in_a_spawned_process(gpu.kv_budget_in_a_gpu_call, job)
    assert_same(here, there)
    assert work.rows <= job.forwards * job.layers, 'the job counts at least the forwards that run'
    assert seconds == gpu.kv_budget_in_a_gpu_call.gpu_seconds(job) == gpu_seconds(job.tokens, job.layers, job.forwards)


def test_the_reserved_seconds_grow_with_the_work_between_a_floor_and_a_cap(registry):
    loaded = registry.get('embedded/kdgqa')
    _, x = model_input(loaded, load_image(str(EXAMPLES_DIR / 'cifar10_ship.jpg')).image)
    seconds = gpu.forwards_in_a_gpu_call.gpu_seconds
    one = gpu.ForwardJob.of(loaded.config, loaded.model, x, False, loaded.labels)
    deep = gpu.ForwardJob.of(loaded.config, loaded.model, x, True, loaded.labels)
    assert (one.forwards, one.tokens, one.layers) == (1, 65, 6) and seconds(one) == MIN_GPU_SECONDS, 'the floor'
    assert seconds(deep) > seconds(one), 'ablation and faithfulness: hundreds of forwards more'
    # a ViT-B/16 at 224 px with ablation: 197 tokens, 12 layers, 12 heads
    vit_b = gpu_seconds(197, 12, analysis_forwards([12 + 12] * 12, True))
    assert MIN_GPU_SECONDS < vit_b < gpu_seconds(577, 12, analysis_forwards([12 + 12] * 12, True)) < MAX_GPU_SECONDS
    assert gpu_seconds(577, 24, analysis_forwards([16 + 16] * 24, True)) == MAX_GPU_SECONDS, 'the cap'
    mha = registry.get('embedded/mha')
    images = calibration_images(mha.preprocessing, 136)
    few, many = (gpu.KVBudgetJob.of(mha.config, mha.model, images[8:8 + n], None, images[:8], 1e10) for n in (16, 128))
    reserved = gpu.kv_budget_in_a_gpu_call.gpu_seconds
    assert MIN_GPU_SECONDS <= reserved(few) < reserved(many), 'more images: more seconds'


def test_with_spaces_installed_and_no_zerogpu_nothing_changes(app_server):
    import spaces  # a test dependency (requirements-dev.txt); the ZeroGPU Space has it preinstalled
    assert not spaces.config.Config.zero_gpu and not gpu.on_zerogpu()
    assert not hasattr(gpu.forwards_in_a_gpu_call, 'zerogpu'), 'the decorator returned the function itself'
    got = Client(app_server[0], verbose=False).predict(handle_file(str(EXAMPLES_DIR / 'cifar10_dog.jpg')),
                                                       'embedded/kdgqa', api_name='/predict')
    assert len(got) == 5
