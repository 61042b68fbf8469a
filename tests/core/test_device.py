"""The device choice (``--device`` / ``GQA_LENS_DEVICE``), tested on whatever this machine has: CUDA is used when
there is one and never claimed when there is not."""
import subprocess
import sys

import pytest
import torch

from gqa_core.core.device import DEVICE_ENV, model_device, resolve_device

HAS_CUDA = torch.cuda.is_available()


def test_auto_is_cuda_exactly_when_the_machine_has_it(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device().type == ('cuda' if HAS_CUDA else 'cpu')
    assert resolve_device('auto').type == ('cuda' if HAS_CUDA else 'cpu')


def test_the_environment_and_the_flag_choose(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, 'cpu')
    assert resolve_device() == torch.device('cpu')
    assert resolve_device('CPU ') == torch.device('cpu'), 'case and spaces do not matter'
    monkeypatch.setenv(DEVICE_ENV, 'auto')
    assert resolve_device('cpu') == torch.device('cpu'), 'the flag wins over the environment'


@pytest.mark.parametrize('text,message', [('tpu', 'device must be auto, cpu, cuda or cuda:N'),
                                          ('meta', 'device must be'), ('cuda:x', 'device must be'),
                                          ('cuda:99', 'CUDA device')])
def test_a_device_this_machine_cannot_use_is_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(text)


def test_cuda_is_never_claimed_without_one():
    if HAS_CUDA:
        assert resolve_device('cuda').type == 'cuda'
    else:
        with pytest.raises(ValueError, match="'cuda' was asked for, but this machine has no CUDA device"):
            resolve_device('cuda')


def test_the_registry_loads_models_on_the_chosen_device_and_analyses_there(registry):
    from PIL import Image
    from support import EXAMPLES_DIR
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.models import ModelRegistry
    cpu = ModelRegistry(registry.embedded_dir, device='cpu')
    loaded = cpu.get('embedded/kdgqa')
    assert cpu.device == torch.device('cpu') and model_device(loaded.model) == torch.device('cpu')
    analysis = analyse(loaded, Image.open(EXAMPLES_DIR / 'cifar10_cat.jpg'), deep=True)
    assert analysis.recording.logits.device.type == 'cpu' and analysis.ablation is not None
    with pytest.raises(ValueError, match='device must be'):
        ModelRegistry(registry.embedded_dir, device='tpu')


def test_every_cli_takes_device():
    for module in ('gqa_core.evaluate', 'gqa_core.kv_budget', 'gqa_core.stats', 'gqa_core.train'):
        out = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and '--device' in out.stdout, (module, out.stderr[-500:])


def test_the_app_runs_models_where_its_settings_say(monkeypatch):
    import app
    monkeypatch.setenv(DEVICE_ENV, 'cpu')
    assert app.LensApp(app.Settings.from_env()).registry.device == torch.device('cpu')
    monkeypatch.setenv(DEVICE_ENV, 'tpu')
    with pytest.raises(ValueError, match="got 'tpu'"):
        app.LensApp(app.Settings.from_env())
    assert app.LensApp(app.cli_settings(['--device', 'cpu'])).registry.device == torch.device('cpu'), 'the flag wins'
