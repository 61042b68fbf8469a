"""Calibrated conversion outside the library: the spec and the app over HTTP, the saved config and card, the
conversion CLI, the trainer's calibrated start and the Hub note of the conversion builder."""
import json
import time

import pytest
import torch
from gradio_client import Client, handle_file

from support import EXAMPLES_DIR
from support.answers import columns
from gqa_core.core.policies import POLICIES
from gqa_core.io.config import GQALensConfig
from gqa_core.io.hub import from_pretrained, save_pretrained
from gqa_core.io.safe_config import ConfigError
from gqa_core.lens.specs import SpecError, parse_spec
from support.hub_server import HubServer

SPEC = 'convert:embedded/mha:gqa:4:calibrated'


@pytest.mark.parametrize('text, grouping, init', [
    (SPEC, 'consecutive', 'calibrated'),
    ('convert:embedded/mha:kdgqa:2:output-error:calibrated', 'output-error', 'calibrated'),
    ('convert:embedded/mha:gqa:4:mean', 'consecutive', 'mean'),
])
def test_the_spec_names_how_the_kv_heads_are_made(text, grouping, init):
    spec = parse_spec(text, tuple(POLICIES))
    assert (spec.head_order, spec.init) == (grouping, init)
    assert str(parse_spec(str(spec), tuple(POLICIES))) == str(spec)
    assert (':calibrated' in str(spec)) == (init == 'calibrated')


@pytest.mark.parametrize('text', ['convert:embedded/mha:gqa:4:calibrated:output-error',
                                  'convert:embedded/mha:gqa:4:calibrated:calibrated',
                                  'convert:embedded/mha:gqa:calibrated'])
def test_a_misplaced_init_is_refused(text):
    with pytest.raises(SpecError):
        parse_spec(text, tuple(POLICIES))


def test_the_app_calibrates_within_its_budget_and_shows_where_gqa_hurts(app_server):
    url, app = app_server
    from gqa_core.lens.models import LIVE_CALIBRATION
    client = Client(url, verbose=False, httpx_kwargs={'timeout': 300})
    args = [handle_file(str(EXAMPLES_DIR / 'cifar10_ship.jpg')), 'embedded/mha', SPEC, '', '', 'where GQA hurts',
            0, 'mean', 'mean', 'zero', False]
    out = client.predict(*args, api_name='/run')
    mha, calibrated = columns(out)[:2]
    assert 'K/V calibrated on 512 images in' in calibrated['summary'], calibrated['summary']
    assert calibrated['figure'] is not None and 'Mean-pooling hurts most by layer' in calibrated['caption']
    assert mha['figure'] is None and 'no calibration report' in mha['caption']
    report = app.lens.registry.get(SPEC).calibration
    assert report.flops <= LIVE_CALIBRATION.max_flops and report.steps_per_layer < LIVE_CALIBRATION.steps
    assert all(c < m for m, c in zip(report.error_mean_pooled, report.error_calibrated))
    assert SPEC in app.lens.registry._cache, 'the calibrated model is cached per spec'
    start = time.perf_counter()
    client.predict(*args, api_name='/run')
    assert time.perf_counter() - start < 15, 'the second request did not calibrate again'


def test_a_calibrated_model_saves_and_loads_with_its_record(tmp_path, app_server):
    from gqa_core.lens.models import ModelRegistry
    loaded = app_server[1].lens.registry.get(SPEC)  # calibrated once for the whole session
    folder = save_pretrained(loaded.model, tmp_path / 'm', labels=loaded.labels)
    config = json.loads((folder / 'config.json').read_text())
    assert config['conversion']['init'] == 'calibrated' and config['conversion']['images'] == 512
    assert 'shipped CIFAR-10' in config['conversion']['data']
    card = (folder / 'README.md').read_text()
    assert 'calibrated without labels on 512 images of the shipped CIFAR-10 training images' in card
    again = from_pretrained(str(folder))
    assert again.gqa_conversion == config['conversion']
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), loaded.model(x), atol=1e-5)
    registry = ModelRegistry(model_dirs=[tmp_path])
    assert 'K/V calibrated on 512 images' in registry.get('local:m').summary()


@pytest.mark.parametrize('conversion, message', [
    ({'init': 'magic'}, 'conversion.init'),
    ({'images': 5}, 'conversion.init is required'),
    ({'init': 'calibrated', 'data': 'x' * 200}, 'conversion.data'),
    ({'init': 'calibrated', 'path': '/etc/passwd'}, 'not an allowed key'),
    ({'init': 'calibrated', 'seconds': float('nan')}, 'conversion.seconds'),
    ('calibrated', 'must be an object'),
])
def test_a_hostile_conversion_record_is_refused(conversion, message):
    config = json.loads(open('assets/models/gqa/config.json').read())
    config['conversion'] = conversion
    with pytest.raises(ConfigError, match=message):
        GQALensConfig.from_json(config)


def test_the_conversion_cli_saves_a_calibrated_model_with_its_report(tmp_path, cifar_subset, capsys):
    from gqa_core.lens.calibrated_conversion import main
    out = tmp_path / 'converted'
    main(['assets/models/mha', '--variant', 'kdgqa', '--kv-heads', '4', '--steps', '10', '--images', '64',
          '--eval', str(cifar_subset), '--held-out', '32', '--out', str(out), '--json', str(tmp_path / 'r.json')])
    text = capsys.readouterr().out
    assert 'mean-pooled   calibrated' in text and 'test top-1 over' in text and 'held-out' in text
    report = json.loads((tmp_path / 'r.json').read_text())
    assert report['top1']['result'] > report['top1']['mean_pooled']
    assert sum(report['held_out']['error_result']) < sum(report['held_out']['error_mean_pooled'])
    assert (out / 'calibration.html').stat().st_size > 1000 and (out / 'calibration.json').is_file()
    loaded = from_pretrained(str(out))
    assert loaded.gqa_conversion['steps_per_layer'] == 10 and loaded.gqa_conversion['images'] == 64
    assert '10 optimisation steps a layer' in (out / 'README.md').read_text()


def test_the_cli_refuses_a_grouped_source_in_one_line(capsys):
    from gqa_core.lens.calibrated_conversion import main
    with pytest.raises(SystemExit, match='is kdgqa; convert from a multi-head model'):
        main(['assets/models/kdgqa', '--kv-heads', '2'])


def test_the_trainer_starts_from_the_calibrated_model(tmp_path, cifar_subset):
    from gqa_core.training.train import parse_args, run
    cfg = parse_args(['--data', str(cifar_subset), '--init-from', 'assets/models/mha', '--variants', 'gqa',
                      '--num-kv-heads', '2', '--init', 'calibrated', '--calibration-steps', '5',
                      '--calibration-images', '32', '--epochs', '1', '--max-steps', '2', '--batch-size', '16',
                      '--workers', '0', '--out', str(tmp_path / 'run')])
    run(cfg)
    config = json.loads((tmp_path / 'run' / 'gqa' / 'model' / 'config.json').read_text())
    assert config['conversion']['init'] == 'calibrated' and config['conversion']['steps_per_layer'] == 5
    with pytest.raises(SystemExit):
        parse_args(['--data', 'x', '--init', 'magic'])


def test_the_builder_says_at_once_whether_the_hub_can_be_reached(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from gqa_core.lens.models import HUB_SOURCES, hub_note
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    with HubServer(tmp_path) as hub:
        monkeypatch.setattr(constants, 'ENDPOINT', hub.url)
        assert hub_note(HUB_SOURCES[0]).startswith('downloaded from the Hub')
        assert hub.requests and all(auth is None for _, auth in hub.requests), 'no token is sent'
    start = time.perf_counter()
    assert 'cannot be reached' in hub_note(HUB_SOURCES[1])  # the local Hub is gone: connection refused
    assert time.perf_counter() - start < 3
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert 'cannot be reached' in hub_note(HUB_SOURCES[2])
    assert hub_note('embedded/mha') == ''
    assert hub_note('convert:x').startswith('⚠️')


def test_the_kv_budget_compares_mean_pooled_and_calibrated_conversions(registry):
    from gqa_core.core.calibrate import CalibrationBudget
    from gqa_core.lens.calibration import calibration_images
    from gqa_core.lens.explorer import kv_budget_table
    from gqa_core.lens.figures import kv_budget_figure
    from gqa_core.lens.kv_budget import kv_budget_rows
    mha = registry.get('embedded/mha').model
    images = calibration_images(registry.get('embedded/mha').preprocessing, 160)
    rows = kv_budget_rows(mha, images[96:], None, images[:96], variants=('gqa',), head_orders=('consecutive',),
                          inits=('mean', 'calibrated'), budget=CalibrationBudget(steps=20, batch_images=16))
    by = {(r['num_kv_heads'], r['init']): r for r in rows}
    for g in (2, 4):
        assert by[(g, 'calibrated')]['agreement'] > by[(g, 'mean')]['agreement'], (g, by)
    figure = kv_budget_figure(dict(rows=rows))
    assert {t.name for t in figure.data} >= {'GQA · consecutive · mean', 'GQA · consecutive · calibrated'}
    assert {r[3] for r in kv_budget_table(dict(rows=rows))} == {'mean', 'calibrated'}


def test_a_live_calibration_too_large_for_the_server_is_refused_before_any_work():
    import timm
    from gqa_core.lens.models import ModelRegistry
    with torch.device('meta'):  # no weights, no memory: the refusal reads only the geometry
        model = timm.create_model('vit_large_patch14_dinov2')
    spec = parse_spec('convert:vit_large_patch14_dinov2:gqa:8:output-error:calibrated', tuple(POLICIES))
    with pytest.raises(ValueError, match='too large to calibrate live.*python -m gqa_core.convert'):
        ModelRegistry._convert(model, spec, None)
