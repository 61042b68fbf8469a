"""transformers-format repos and folders load as the equivalent timm model, checked against transformers itself
(a test-only reference) with random weights: ViT, DeiT, DINOv2, DINOv2 with registers, DINOv3."""
import json
import os
import subprocess
import sys

import pytest
import torch

import transformers  # noqa: F401  the reference (requirements-dev.txt)

from gqa_core import from_pretrained, grouping_config  # noqa: E402
from gqa_core.io.hub import ModelLoadError  # noqa: E402
from support.hub_server import HubServer  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def reference_models():
    """key -> (transformers model with every parameter perturbed, image side, what to compare)."""
    from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTModel, DINOv3ViTConfig,
                              DINOv3ViTModel, Dinov2Config,
                              Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig,
                              ViTForImageClassification, ViTModel)
    vit = dict(image_size=32, patch_size=8, intermediate_size=128, **SMALL)
    dino = dict(image_size=56, patch_size=14, mlp_ratio=2, **SMALL)
    models = {
        'vit-classifier': (ViTForImageClassification(ViTConfig(num_labels=3, **vit)), 32, 'logits'),
        'vit-backbone': (ViTModel(ViTConfig(**vit), add_pooling_layer=True), 32, 'features'),
        'deit-teacher': (DeiTForImageClassificationWithTeacher(DeiTConfig(num_labels=5, **vit)), 32, 'logits'),
        'deit-backbone': (DeiTModel(DeiTConfig(**vit)), 32, 'features'),
        'dinov2': (Dinov2Model(Dinov2Config(**dino)), 56, 'features'),
        'dinov2-registers': (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **dino)), 56,
                             'features'),
        'dinov3': (DINOv3ViTModel(DINOv3ViTConfig(image_size=64, patch_size=16, intermediate_size=128,
                                                  num_register_tokens=4, **SMALL)), 64, 'features'),  # RoPE
    }
    torch.manual_seed(0)
    for model, _, _ in models.values():
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return models


def reference_output(model, x, what):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if what == 'logits' else out.last_hidden_state


def ours(model, x, what):
    with torch.no_grad():
        return model(x) if what == 'logits' else model.forward_features(x)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """Every reference model saved by transformers' own save_pretrained under ``root/hf/<key>``."""
    root = tmp_path_factory.mktemp('hub')
    models = reference_models()
    for key, (model, _, _) in models.items():
        model.save_pretrained(root / 'hf' / key)
    return root, models


def test_local_folders_equal_the_transformers_models(saved):
    root, models = saved
    for key, (reference, side, what) in models.items():
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
        model = from_pretrained(str(root / 'hf' / key)).eval()
        assert grouping_config(model)['variant'] == 'mha'
        expected = reference_output(reference, x, what)
        assert (ours(model, x, what) - expected).abs().max() <= 1e-4, key
        if what == 'logits':
            labels = model.pretrained_cfg['label_names']
            assert labels == [reference.config.id2label[i] for i in range(len(labels))]


HUB_SCRIPT = r'''
import json, sys, torch
from gqa_core import from_pretrained, grouping_config
from gqa_core.lens.models import ModelRegistry
x = {int(k): v for k, v in torch.load(sys.argv[1]).items()}
keys = json.loads(sys.argv[2])
registry = ModelRegistry()
out = {}
for key, (side, what) in keys.items():
    model = from_pretrained(f'hf/{key}', local=False).eval()
    with torch.no_grad():
        y = model(x[side]) if what == 'logits' else model.forward_features(x[side])
    loaded = registry.get(f'hub:hf/{key}')
    converted = registry.get(f'convert:hf-hub:hf/{key}:kdgqa:2')
    out[key] = dict(y=y.tolist(), spec=loaded.grouping['variant'], converted=converted.grouping['variant'],
                    kv=converted.grouping['num_kv_heads'])
print('RESULT' + json.dumps(out))
'''


def test_hub_repos_over_http_load_and_convert_through_every_spec(saved, tmp_path):
    """``from_pretrained(repo)``, ``hub:ORG/NAME`` (as MHA) and ``convert:hf-hub:ORG/NAME:VARIANT:G`` against a
    real HTTP server speaking the Hub's routes."""
    root, models = saved
    xs = {side: torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2)) for side in (32, 56, 64)}
    torch.save(xs, tmp_path / 'x.pt')
    keys = {key: (side, what) for key, (_, side, what) in models.items()}
    env = dict(os.environ, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf-home'), HF_HUB_DISABLE_XET='1')
    with HubServer(root) as server:
        env['HF_ENDPOINT'] = server.url
        proc = subprocess.run([sys.executable, '-c', HUB_SCRIPT, str(tmp_path / 'x.pt'), json.dumps(keys)], env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('RESULT', 1)[1])
    for key, (reference, side, what) in models.items():
        expected = reference_output(reference, xs[side], what)
        assert (torch.tensor(result[key]['y']) - expected).abs().max() <= 1e-4, key
        assert result[key]['spec'] == 'mha' and result[key]['converted'] == 'kdgqa' and result[key]['kv'] == 2


def test_the_registry_serves_a_transformers_folder_as_local(saved, tmp_path):
    from gqa_core.lens.models import ModelRegistry
    root, _ = saved
    registry = ModelRegistry(model_dirs=[root / 'hf'])
    loaded = registry.get('local:vit-classifier')
    assert loaded.labels == ['LABEL_0', 'LABEL_1', 'LABEL_2'] and loaded.grouping['variant'] == 'mha'
    converted = registry.get('convert:local:dinov2-registers:gqa:2')
    assert converted.grouping['num_kv_heads'] == 2 and converted.model.num_prefix_tokens == 5


def test_hostile_or_unsupported_configs_are_refused_by_name(saved, tmp_path):
    root, _ = saved
    source = root / 'hf' / 'vit-classifier'
    cases = {
        'DeiTForImageClassification': ('architectures', ['DeiTForImageClassification'], 'averages the class'),
        'an unknown class': ('architectures', ['SwinModel'], 'not a transformers class GQA Lens reads'),
        'a string width': ('hidden_size', '64', 'hidden_size must be an int'),
        'a huge image': ('image_size', 10 ** 9, 'image_size must be an int'),
        'another activation': ('hidden_act', 'relu', 'hidden_act must be "gelu"'),
        'a wrong model_type': ('model_type', 'dinov2', "model_type must be 'vit'"),
        'bad labels': ('id2label', {'0': 'a', 'x': 'b'}, 'id2label'),
    }
    for label, (key, value, message) in cases.items():
        folder = tmp_path / label.replace(' ', '-')
        folder.mkdir()
        config = json.loads((source / 'config.json').read_text())
        config[key] = value
        (folder / 'config.json').write_text(json.dumps(config))
        (folder / 'model.safetensors').write_bytes((source / 'model.safetensors').read_bytes())
        with pytest.raises(ModelLoadError, match=message):
            from_pretrained(str(folder))
    # a tensor with no place in timm's model is named, not silently dropped
    from safetensors.torch import load_file, save_file
    folder = tmp_path / 'extra-tensor'
    folder.mkdir()
    (folder / 'config.json').write_text((source / 'config.json').read_text())
    state = load_file(source / 'model.safetensors')
    state['vit.encoder.layer.0.attention.attention.rotary.weight'] = torch.zeros(2)
    save_file(state, folder / 'model.safetensors')
    with pytest.raises(ModelLoadError, match='rotary.weight'):
        from_pretrained(str(folder))
    # the size budget is applied before the weights are read
    from gqa_core.io.safe_config import Budget
    with pytest.raises(ModelLoadError, match='parameters; this server allows'):
        from_pretrained(str(source), budget=Budget(max_params=1000))


def test_a_converted_transformers_model_saves_and_loads_bit_identical(saved, tmp_path):
    """Its LayerNorm epsilon (1e-12 in transformers' ViT, 1e-6 in timm's) travels in config.json as norm_eps."""
    from gqa_core import convert, save_pretrained
    root, models = saved
    for key in ('vit-classifier', 'dinov2-registers'):
        model = convert(from_pretrained(str(root / 'hf' / key)), 'kdgqa', 2).eval()
        save_pretrained(model, tmp_path / key)
        config = json.loads((tmp_path / key / 'config.json').read_text())
        eps = models[key][0].config.layer_norm_eps
        assert config.get('norm_eps') == (eps if eps != 1e-6 else None)
        loaded = from_pretrained(str(tmp_path / key)).eval()
        x = torch.randn(2, 3, models[key][1], models[key][1])
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), key
