"""Model specs and configs are untrusted input: over real HTTP, every hostile class gets a clear message that
shows no server path, nothing outside the allowed folders is opened, and the app keeps serving."""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from support import ALLOWED_MODELS, EXAMPLES_DIR, ROOT
from support.answers import columns

SENTINEL = ALLOWED_MODELS.parent / f'{ALLOWED_MODELS.name}-sentinel.pth'  # outside the allowed folder
OPENED = []


def _audit(event, args):  # in-process server: every file the app opens passes through here
    if event == 'open' and args and isinstance(args[0], (str, bytes, os.PathLike)) and 'sentinel' in str(args[0]):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def write_config(name: str, **changes) -> Path:
    base = json.loads((ROOT / 'assets' / 'models' / 'mha' / 'config.json').read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    folder = ALLOWED_MODELS / name
    folder.mkdir(exist_ok=True)
    (folder / 'config.json').write_text(json.dumps(base))
    (folder / 'model.safetensors').write_bytes((ROOT / 'assets' / 'models' / 'mha' / 'model.safetensors').read_bytes())
    return folder


@pytest.fixture(scope='module')
def hostile(app_server, tmp_path_factory):
    SENTINEL.write_bytes(b'never read me')
    write_config('loader-opts', backbone_args={'checkpoint_path': str(SENTINEL)})
    write_config('overlay', backbone_args={'pretrained_cfg_overlay': {'file': str(SENTINEL)}})
    write_config('pretrained', backbone_args={'pretrained': True})
    write_config('huge-params', backbone_args={'embed_dim': 4096, 'depth': 64, 'num_heads': 64})
    write_config('huge-tokens', backbone_args={'img_size': 4096, 'patch_size': 4})
    write_config('not-vit', backbone='resnet50')
    write_config('tiny-crop', preprocessing={'crop_pct': 1e-9})
    write_config('bad-labels', labels=['x' * 5000] * 10)
    outside = tmp_path_factory.mktemp('outside') / 'mha-copy'
    outside.mkdir()
    for f in ('config.json', 'model.safetensors'):
        (outside / f).write_bytes((ROOT / 'assets' / 'models' / 'mha' / f).read_bytes())
    (ALLOWED_MODELS / 'escape').symlink_to(outside, target_is_directory=True)
    write_config('fine')  # a legitimate model in the allowed folder: served as local:fine
    OPENED.clear()  # writing the sentinel above was us, not the app
    yield app_server[0], outside
    SENTINEL.unlink(missing_ok=True)


def server_paths(outside: Path) -> list:
    return [str(ROOT), str(ALLOWED_MODELS), str(outside), str(SENTINEL), os.path.expanduser('~'), '/tmp', '/root',
            'site-packages']


def run_spec(url: str, spec: str) -> list:
    client = Client(url, verbose=False)
    return client.predict(handle_file(str(EXAMPLES_DIR / 'cifar10_cat.jpg')), 'embedded/mha', spec, '', '',
                          'attention', 0, 'mean', 'mean', 'zero', False, api_name='/run')


HOSTILE = {
    # absolute and relative paths, traversal: never resolved outside their folder
    'hub:/etc': 'needs a Hub repo id',
    'hub:/root/.cache': 'needs a Hub repo id',
    'hub:../assets/models/mha': 'needs a Hub repo id',
    'hub:assets/../../etc': 'needs a Hub repo id',
    'embedded/../..': 'embedded/NAME must be one folder name',
    'embedded/../../tests': 'embedded/NAME must be one folder name',
    'embedded/mha/../../..': 'embedded/NAME must be one folder name',
    'local:..': 'local:NAME must be one folder name',
    'local:escape': "no model 'local:escape'",  # a symlink out of the allowed folder
    'local:does-not-exist': "no model 'local:does-not-exist'",
    'convert:embedded/../x:gqa:2': 'embedded/NAME must be one folder name',
    'convert:/etc/passwd:gqa:2': 'unknown model spec',
    'convert:embedded/mha:gqa:999': 'G must be an integer 1..64',
    'convert:embedded/mha:evil:2': 'unknown variant',
    'convert:resnet50:gqa:2': 'not a timm Vision Transformer',
    # configs in an allowed folder are still data
    'local:loader-opts': "'checkpoint_path' is not an allowed key",
    'local:overlay': "'pretrained_cfg_overlay' is not an allowed key",
    'local:pretrained': "'pretrained' is not an allowed key",
    'local:huge-params': 'this server allows 350,000,000',
    'local:huge-tokens': 'tokens per image; this server allows',
    'local:not-vit': 'is not a timm Vision Transformer',
    'local:tiny-crop': 'crop_pct must be a number 0.25..1',
    'local:bad-labels': 'labels must be null or 10 strings',
    # sizes
    'x' * 10_000: 'model spec is 10,000 characters; the limit is 200',
    'hub:' + 'a' * 256: 'model spec is 260 characters',
    'hub:' + 'a' * 150 + '/b': 'needs a Hub repo id',
}


@pytest.mark.parametrize('spec', list(HOSTILE), ids=[s[:40] for s in HOSTILE])
def test_hostile_specs_get_a_named_refusal_and_no_server_path(hostile, spec):
    url, outside = hostile
    out = run_spec(url, spec)
    status, summaries = out[0], [c['summary'] for c in columns(out)]
    assert HOSTILE[spec] in status, status
    assert len(status) < 600, 'a huge input is never echoed back'
    for path in server_paths(outside):
        assert path not in status, (path, status)
    assert 'Traceback' not in status
    assert 'MHA' in summaries[0], 'the other column still ran'
    for path in server_paths(outside):
        assert path not in summaries[1], (path, summaries[1])
    assert not OPENED, f'opened outside the allowed folders: {OPENED}'


def test_a_legitimate_model_in_an_allowed_folder_loads(hostile):
    out = run_spec(hostile[0], 'local:fine')
    assert out[0].startswith('done') and 'local:fine' in columns(out)[1]['summary']


def test_an_uploaded_config_named_by_its_upload_path_is_refused(hostile, tmp_path):
    url, outside = hostile
    evil = tmp_path / 'config.json'
    evil.write_text(json.dumps({'backbone': 'vit_tiny_patch16_224', 'grouping': {'variant': 'mha'},
                                'backbone_args': {'checkpoint_path': str(SENTINEL)}}))
    response = httpx.post(f'{url}/gradio_api/upload', files={'files': ('config.json', evil.read_bytes())})
    uploaded = Path(response.json()[0])
    assert uploaded.is_file(), 'the upload route stored the file on the server'
    for spec in (f'hub:{uploaded.parent}', f'hub:{uploaded.parent.name}/{uploaded.parent.name}',
                 f'local:{uploaded.parent.name}', f'convert:hub:{uploaded.parent}:gqa:2',
                 f'embedded/{uploaded.parent.name}'):
        status = run_spec(url, spec)[0]
        assert status.startswith('⚠️'), status
        assert str(uploaded.parent) not in status and '/tmp' not in status, status
    assert not OPENED


def test_predict_endpoint_refuses_hostile_specs_and_keeps_serving(hostile):
    from gradio_client.exceptions import AppError
    client = Client(hostile[0], verbose=False)
    image = handle_file(str(EXAMPLES_DIR / 'cifar10_dog.jpg'))
    for spec, expected in (('local:loader-opts', 'not an allowed key'), ('x' * 10_000, 'the limit is 200'),
                           ('hub:/etc', 'needs a Hub repo id')):
        with pytest.raises(AppError, match=expected):
            client.predict(image, spec, api_name='/predict')
    assert len(client.predict(image, 'embedded/mha', api_name='/predict')) == 5


def test_concurrent_hostile_and_normal_requests(hostile):
    """Refusals do not disturb other users: 8 clients mixing hostile and normal specs in parallel."""
    url = hostile[0]
    expected = Client(url, verbose=False).predict(handle_file(str(EXAMPLES_DIR / 'cifar10_dog.jpg')), 'embedded/gqa',
                                                  api_name='/predict')

    def one(i):
        client = Client(url, verbose=False)
        image = handle_file(str(EXAMPLES_DIR / 'cifar10_dog.jpg'))
        if i % 2:
            return client.predict(image, 'embedded/gqa', api_name='/predict')
        return run_spec(url, 'local:loader-opts')[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r == expected for r in results[1::2])
    assert all('not an allowed key' in r for r in results[0::2])


HUB_SCRIPT = '''
import json, sys
opened = []
sys.addaudithook(lambda e, a: opened.append(str(a[0])) if e == 'open' and a and 'sentinel' in str(a[0]) else None)
from gqa_core.lens.models import ModelRegistry
registry = ModelRegistry()
out = {}
for spec in sys.argv[1:]:
    try:
        registry.get(spec)
        out[spec] = 'loaded'
    except ValueError as e:
        out[spec] = str(e)
out['opened'] = opened
print('RESULT' + json.dumps(out))
'''


def test_configs_fetched_from_the_hub_are_data(tmp_path):
    """Over real HTTP (a local Hub on 127.0.0.1): GQA Lens and timm-format configs with loader options, paths,
    huge models, other architectures, pickle-only weights or broken JSON are refused before anything is built."""
    import subprocess
    from support.hub_server import HubServer
    sentinel = tmp_path / 'sentinel.pth'
    sentinel.write_bytes(b'never read me')
    mha = ROOT / 'assets' / 'models' / 'mha'
    ours = json.loads((mha / 'config.json').read_text())
    timm_cfg = dict(architecture='vit_tiny_patch16_224', num_classes=10,
                    model_args=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=6),
                    pretrained_cfg=dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3))
    repos = {
        'evil/loader-opts': ({**ours, 'backbone_args': {**ours['backbone_args'], 'checkpoint_path': str(sentinel)}},
                             'model.safetensors'),
        'evil/huge': ({**ours, 'backbone_args': {**ours['backbone_args'], 'embed_dim': 4096, 'depth': 64,
                                                 'num_heads': 64}}, 'model.safetensors'),
        'evil/timm-opts': ({**timm_cfg, 'model_args': {**timm_cfg['model_args'], 'checkpoint_path': str(sentinel)}},
                           'model.safetensors'),
        'evil/timm-overlay': ({**timm_cfg, 'pretrained_cfg': {**timm_cfg['pretrained_cfg'], 'file': str(sentinel),
                                                              'crop_pct': 1e-9}}, 'model.safetensors'),
        'evil/timm-bin': (timm_cfg, 'pytorch_model.bin'),
        'evil/timm-huge': ({**timm_cfg, 'architecture': 'vit_giant_patch14_224', 'model_args': {}},
                           'model.safetensors'),
        'evil/timm-arch': ({**timm_cfg, 'architecture': 'resnet50'}, 'model.safetensors'),
        'evil/not-json': ('{"backbone": ', 'model.safetensors'),
    }
    for repo, (config, weights) in repos.items():
        folder = tmp_path / 'hub' / repo
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(config if isinstance(config, str) else json.dumps(config))
        (folder / weights).write_bytes(b'pickle would be here' if weights.endswith('.bin') else
                                       (mha / 'model.safetensors').read_bytes())
    specs = {
        'hub:evil/loader-opts': "'checkpoint_path' is not an allowed key",
        'hub:evil/huge': 'this server allows 350,000,000',
        'convert:hf-hub:evil/timm-opts:gqa:2': "'checkpoint_path' is not an allowed key",
        'convert:hf-hub:evil/timm-overlay:gqa:2': 'crop_pct must be a number 0.25..1',
        'convert:hf-hub:evil/timm-bin:gqa:2': 'never unpickles',
        'convert:hf-hub:evil/timm-huge:gqa:2': 'this server allows 350,000,000',
        'convert:hf-hub:evil/timm-arch:gqa:2': 'is not a timm Vision Transformer',
        'hub:evil/not-json': 'config.json is not valid JSON',
    }
    env = dict(os.environ, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf-home'), HF_HUB_DISABLE_XET='1')
    with HubServer(tmp_path / 'hub') as server:
        env['HF_ENDPOINT'] = server.url
        proc = subprocess.run([sys.executable, '-c', HUB_SCRIPT, *specs], env=env, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('RESULT', 1)[1])
    for spec, expected in specs.items():
        assert expected in result[spec], (spec, result[spec])
        assert str(tmp_path) not in result[spec]
    assert result['opened'] == [], 'a path named in a config was opened'
