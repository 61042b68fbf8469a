"""A corpus of hostile Hub repos: broken configs, weights that do not fit, weights that compute NaN, pickles.

Each :class:`HostileRepo` is one repo served by the local Hub (:mod:`support.hub_server`) under ``hostile/NAME``
and the spec a visitor types for it; ``expected`` is a fragment of the one line the app must answer (None: the
repo is fine and must load). ``config_refused``: the config alone is refused, so no weights file may be fetched.

The repos start from the shipped ``embedded/mha`` model (a GQA Lens config and its fp16 weights) or from a
timm-format repo of the same geometry, and change one thing each.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save

from support import ROOT

ORG = 'hostile'
MHA = ROOT / 'assets' / 'models' / 'mha'
DGQA = ROOT / 'assets' / 'models' / 'dgqa-diff'  # DGQA: its allocation (KV groups' sizes) is in the weights
WEIGHTS = 'model.safetensors'
PICKLE = 'pytorch_model.bin'
PICKLES = (PICKLE, 'model.pth', 'model.pt', 'pytorch_model.pkl')  # names pickled weights go by
# Small budgets for the app under test, so that the budget cases stay cheap to describe (GQA_LENS_MAX_*).
MAX_PARAMS = 5_000_000
MAX_TOKENS = 300


@dataclass(frozen=True)
class HostileRepo:
    """One repo: its files (name -> bytes), how a visitor names it, what the app must answer."""
    name: str
    files: Dict[str, bytes]
    expected: Optional[str]
    config_refused: bool = False
    timm_format: bool = False

    @property
    def spec(self) -> str:
        repo = f'{ORG}/{self.name}'
        return f'convert:hf-hub:{repo}:gqa:2' if self.timm_format else f'hub:{repo}'


def base_config() -> Dict[str, Any]:
    """The shipped MHA model's config.json, parsed (a fresh copy each call)."""
    return json.loads((MHA / 'config.json').read_text())


def base_state() -> Dict[str, torch.Tensor]:
    """The shipped MHA model's weights (fp16), a fresh copy each call."""
    return load_file(MHA / WEIGHTS)


def timm_config() -> Dict[str, Any]:
    """A timm-format config.json (``hf-hub:`` repos) of the shipped MHA model's geometry."""
    args = {k: base_config()['backbone_args'][k] for k in ('img_size', 'patch_size', 'embed_dim', 'depth',
                                                            'num_heads', 'mlp_ratio')}
    return dict(architecture='vit_tiny_patch16_224', num_classes=10, model_args=args,
                pretrained_cfg=dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3, num_classes=10))


def weights(state: Dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in state.items()})


def changed_state(change: Callable[[Dict[str, torch.Tensor]], None]) -> bytes:
    """The shipped weights after ``change`` edits them in place, as safetensors bytes."""
    state = base_state()
    change(state)
    return weights(state)


def with_args(**args: Any) -> Dict[str, Any]:
    config = base_config()
    config['backbone_args'].update(args)
    return config


def without_arg(key: str, **args: Any) -> Dict[str, Any]:
    """The shipped config with ``args`` changed and ``key`` left to timm's default."""
    config = with_args(**args)
    del config['backbone_args'][key]
    return config


def with_grouping(**grouping: Any) -> Dict[str, Any]:
    config = base_config()
    config['grouping'].update(grouping)
    return config


def with_field(key: str, value: Any) -> Dict[str, Any]:
    config = base_config()
    config[key] = value
    return config


def malicious_pickle(sentinel: Path) -> bytes:
    """A pickle that creates the folder ``sentinel`` when unpickled: if it exists, something unpickled it."""
    class Plant:
        def __reduce__(self):
            return os.mkdir, (str(sentinel),)
    return pickle.dumps(Plant())


def safetensors_header(header: bytes, declared: Optional[int] = None, body: bytes = b'') -> bytes:
    """A safetensors file of a raw ``header`` whose length field says ``declared`` (the truth by default)."""
    return struct.pack('<Q', len(header) if declared is None else declared) + header + body


def _config_cases() -> List[HostileRepo]:
    """config.json whose structure or values are hostile: refused before any weight is fetched."""
    deep = '[' * 100_000 + ']' * 100_000
    huge_int = '1' + '0' * 5000
    raw = {  # name -> (config.json text, expected fragment)
        'top-level-list': ('[1, 2, 3]', 'config.json does not hold an object'),
        'top-level-string': ('"vit_tiny_patch16_224"', 'config.json does not hold an object'),
        'empty-object': ('{}', 'not a GQA Lens config'),
        'not-json': ('{"backbone": ', 'config.json is not valid JSON'),
        'not-utf8': ('\udcff', 'config.json is not valid JSON'),
        'deep-nesting': ('{"backbone": "vit_tiny_patch16_224", "backbone_args": ' + deep + '}',
                         'config.json is nested too deeply'),
        'nested-33-levels': ('{"backbone": "vit_tiny_patch16_224", "backbone_args": ' + '[' * 33 + ']' * 33 + '}',
                             'config.json is nested too deeply'),
        'enormous-integer': (json.dumps(base_config()).replace('"depth": 6', '"depth": ' + huge_int),
                             'config.json is not valid JSON'),
        'duplicate-keys': (json.dumps(base_config())[:-1] + ', "backbone": "resnet50"}',
                           "config.json has the key 'backbone' twice"),
        'over-4-mib': (json.dumps(with_field('metrics', {'pad': 'x' * (5 * 2**20)})), 'config.json is over 4 MiB'),
    }
    parsed = {  # name -> (config object, expected fragment)
        'huge-array': (with_args(img_size=[32] * 1_000_000), 'backbone_args.img_size must be'),
        'args-not-object': (with_field('backbone_args', 'img_size=32'), 'backbone_args must be an object'),
        'grouping-not-object': (with_field('grouping', ['mha', 8]), 'grouping must be an object'),
        'backbone-not-string': (with_field('backbone', {'name': 'vit'}), 'backbone must be a timm model name'),
        'preprocessing-not-object': (with_field('preprocessing', 'imagenet'), 'preprocessing must be an object'),
        'variant-a-list': (with_grouping(variant=['mha']), 'grouping.variant must be one of'),
        'variant-unknown': (with_grouping(variant='sparkle'), 'grouping.variant must be one of'),
        'nan-mlp-ratio': (with_args(mlp_ratio=float('nan')), 'backbone_args.mlp_ratio must be'),
        'infinite-classes': (with_field('num_classes', float('inf')), 'num_classes must be an int'),
        'enormous-float': (with_args(embed_dim=1e308), 'backbone_args.embed_dim must be an int'),
        'zero-depth': (with_args(depth=0), 'backbone_args.depth must be an int 1..64'),
        'negative-embed-dim': (with_args(embed_dim=-128), 'backbone_args.embed_dim must be an int'),
        'unknown-backbone': (with_field('backbone', 'vit_does_not_exist_224'), 'is not a timm model'),
        'not-a-vit': (with_field('backbone', 'resnet50'), 'is not a timm Vision Transformer'),
        'patch-larger-than-image': (with_args(img_size=8, patch_size=64), 'the patches are larger than the image'),
        'heads-not-dividing-width': (with_args(num_heads=7), 'num_heads (7) must divide embed_dim (128)'),
        'heads-not-dividing-timm-width': (without_arg('embed_dim', num_heads=7), 'cannot be built'),
        'kv-heads-not-dividing': (with_grouping(variant='gqa', num_kv_heads=3), 'num_kv_heads'),
        'kv-heads-over-heads': (with_grouping(variant='gqa', num_kv_heads=16), 'num_kv_heads'),
        'labels-wrong-length': (with_field('labels', ['cat', 'dog']), 'labels must be null or 10 strings'),
        'labels-wrong-type': (with_field('labels', list(range(10))), 'labels must be null or 10 strings'),
        'mean-wrong-length': (with_field('preprocessing', {**base_config()['preprocessing'], 'mean': [0.5]}),
                              'preprocessing.mean must be three numbers'),
        'zero-std': (with_field('preprocessing', {**base_config()['preprocessing'], 'std': [0.2, 0.0, 0.2]}),
                     'preprocessing.std must not contain 0'),
        'over-param-budget': (with_args(embed_dim=512, depth=12, num_heads=8),
                              f'this server allows {MAX_PARAMS:,}'),
        'over-token-budget': (with_args(img_size=128), f'this server allows {MAX_TOKENS:,}'),
    }
    cases = [HostileRepo(name, {'config.json': text.encode('utf-8', 'surrogateescape'), WEIGHTS: b''}, expected,
                         config_refused=True) for name, (text, expected) in raw.items()]
    cases += [HostileRepo(name, {'config.json': json.dumps(config).encode(), WEIGHTS: b''}, expected,
                          config_refused=True) for name, (config, expected) in parsed.items()]
    timm_over = timm_config()
    timm_over['model_args'].update(embed_dim=512, depth=12)
    cases.append(HostileRepo('timm-over-param-budget', {'config.json': json.dumps(timm_over).encode(), WEIGHTS: b''},
                             f'this server allows {MAX_PARAMS:,}', config_refused=True, timm_format=True))
    timm_broken = {  # name -> (timm-format config, expected fragment)
        'timm-pretrained-cfg-a-list': ({**timm_config(), 'pretrained_cfg': [3, 32, 32]},
                                       'pretrained_cfg must be an object'),
        'timm-model-args-a-list': ({**timm_config(), 'model_args': [32, 4]}, 'model_args must be an object'),
        'timm-architecture-a-number': ({**timm_config(), 'architecture': 7}, 'backbone must be a timm model name'),
    }
    cases += [HostileRepo(name, {'config.json': json.dumps(config).encode(), WEIGHTS: b''}, expected,
                          config_refused=True, timm_format=True) for name, (config, expected) in timm_broken.items()]
    transformers = dict(model_type='vit', architectures=['ViTModel'], hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=8, intermediate_size=256, image_size=32, patch_size=4)
    transformers_broken = {  # name -> (transformers-format config, expected fragment)
        'transformers-architectures-an-object': ({**transformers, 'architectures': {'ViTModel': 1}},
                                                 'architectures must name one transformers class'),
        'transformers-hidden-size-a-string': ({**transformers, 'hidden_size': '128'}, 'hidden_size must be an int'),
    }
    cases += [HostileRepo(name, {'config.json': json.dumps(config).encode(), WEIGHTS: b''}, expected,
                          config_refused=True) for name, (config, expected) in transformers_broken.items()]
    # the weights files above are empty: a fetch would be seen in the Hub's request log, never needed
    return cases


def _weights_cases(sentinel: Path) -> List[HostileRepo]:
    """A valid config with a model.safetensors that does not fit it, is not one, or computes NaN."""
    config = json.dumps(base_config()).encode()
    head = 'head.weight'

    def drop(state):
        del state['blocks.1.attn.proj.weight']

    def extra(state):
        state['blocks.9.attn.secret'] = torch.zeros(3)

    def reshape(state):
        state['pos_embed'] = torch.zeros(1, 17, 128, dtype=torch.float16)

    def to_int8(state):
        state[head] = state[head].to(torch.int8)

    def to_bool(state):
        state['norm.weight'] = state['norm.weight'] != 0

    def nan(state):
        state['blocks.0.mlp.fc1.weight'][0, 0] = float('nan')

    def inf(state):
        state['norm.bias'][3] = float('inf')

    def overflow(state):  # every weight finite (fp32 may hold 3e38), the logits are not
        state[head] = torch.full((10, 128), 3e38)

    good = (MHA / WEIGHTS).read_bytes()
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    files = {  # name -> (weights bytes, expected fragment)
        'weights-missing-key': (changed_state(drop), 'missing blocks.1.attn.proj.weight'),
        'weights-extra-key': (changed_state(extra), 'unexpected blocks.9.attn.secret'),
        'weights-wrong-shape': (changed_state(reshape), 'pos_embed has shape [1, 17, 128]'),
        'weights-int8': (changed_state(to_int8), 'head.weight is int8'),
        'weights-bool': (changed_state(to_bool), 'norm.weight is bool'),
        'weights-nan': (changed_state(nan), 'not finite'),
        'weights-inf': (changed_state(inf), 'not finite'),
        'outputs-overflow': (changed_state(overflow), 'outputs are not finite'),
        'weights-truncated': (good[:len(good) // 2], 'corrupt or truncated'),
        'weights-empty': (b'', 'corrupt or truncated'),
        'header-length-lies': (safetensors_header(header, declared=len(header) + 1000, body=b'\0' * 8),
                               'corrupt or truncated'),
        'header-not-json': (safetensors_header(b'this is not json at all!', body=b'\0' * 8), 'corrupt or truncated'),
        'header-huge': (safetensors_header(b'{}', declared=2**62), 'corrupt or truncated'),
        'offsets-out-of-file': (safetensors_header(header.replace(b'[0, 8]', b'[0, 80]'), body=b'\0' * 8),
                                'corrupt or truncated'),
    }
    cases = [HostileRepo(name, {'config.json': config, WEIGHTS: data}, expected) for name, (data, expected) in
             files.items()]
    pickles = {name: malicious_pickle(sentinel) for name in PICKLES}
    cases.append(HostileRepo('only-pickle', {'config.json': config, **pickles}, 'never unpickles'))
    cases.append(HostileRepo('pickle-and-safetensors', {'config.json': config, WEIGHTS: good, **pickles}, None))
    dgqa_config = (DGQA / 'config.json').read_bytes()
    for name, allocation, expected in (
            ('dgqa-allocation-negative', [-1, 5, 2, 2], 'allocation must give each of the 4 KV heads 0..8'),
            ('dgqa-allocation-over-heads', [100, 3, 1, 2], 'allocation must give each of the 4 KV heads 0..8')):
        state = load_file(DGQA / WEIGHTS)
        state['blocks.0.attn.policy.allocation'] = torch.tensor(allocation)
        cases.append(HostileRepo(name, {'config.json': dgqa_config, WEIGHTS: weights(state)}, expected))
    timm_cfg = json.dumps(timm_config()).encode()
    timm_state = base_state()  # the same names as timm's own ViT
    cases.append(HostileRepo('timm-only-pickle', {'config.json': timm_cfg, PICKLE: malicious_pickle(sentinel)},
                             'never unpickles', timm_format=True))
    # not pos_embed: timm resamples a position table made for another grid, as it should
    reshaped = dict(timm_state, **{'blocks.0.mlp.fc1.weight': torch.zeros(100, 128, dtype=torch.float16)})
    cases.append(HostileRepo('timm-wrong-shape', {'config.json': timm_cfg, WEIGHTS: weights(reshaped)},
                             'blocks.0.mlp.fc1.weight has shape [100, 128], the model needs [256, 128]',
                             timm_format=True))
    nan_state = dict(timm_state, **{head: torch.full((10, 128), float('nan'), dtype=torch.float16)})
    cases.append(HostileRepo('timm-nan', {'config.json': timm_cfg, WEIGHTS: weights(nan_state)}, 'not finite',
                             timm_format=True))
    return cases


def native_repo() -> Tuple[Dict[str, Any], bytes]:
    """config.json (parsed) and weights of a small model that shares K/V heads as timm built it: Sapiens2's
    layout, G per block (4, 2, 2, 4), random weights, saved by GQA Lens as it is."""
    import tempfile
    import timm
    from gqa_core import convert
    from gqa_core.io.hub import save_pretrained
    with torch.random.fork_rng():  # seeded here without moving the global generator other tests draw from
        torch.manual_seed(0)
        model = timm.create_model('vit_base_patch16_sapiens2', img_size=(32, 32), embed_dim=64, depth=4, num_heads=4,
                                  num_kv_heads=(4, 2, 2, 4), num_classes=10)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(convert(model, 'gqa'), folder)
        return json.loads((Path(folder) / 'config.json').read_text()), (Path(folder) / WEIGHTS).read_bytes()


def _native_cases() -> List[HostileRepo]:
    """A model that shares K/V heads per block (served as it is), and its G per block made hostile."""
    config, state = native_repo()

    def changed(section: str, value: Any) -> bytes:
        hostile = json.loads(json.dumps(config))
        hostile[section]['num_kv_heads'] = value
        return json.dumps(hostile).encode()
    bad = {  # name -> (section, num_kv_heads, expected fragment)
        'native-kv-heads-one-short': ('grouping', [4, 2, 2], 'give one integer, or one per block (4)'),
        'native-kv-heads-not-dividing': ('grouping', [4, 3, 2, 4], 'must be a positive divisor of the 4 heads'),
        'native-kv-heads-a-million': ('grouping', [2] * 1_000_000, 'grouping.num_kv_heads must be null or an int'),
        'native-kv-heads-zero': ('grouping', [4, 0, 2, 4], 'grouping.num_kv_heads must be null or an int'),
        'native-kv-heads-nested': ('grouping', [[4], 2, 2, 4], 'grouping.num_kv_heads must be null or an int'),
        'native-backbone-kv-heads-one-short': ('backbone_args', [4, 2, 2], 'cannot be built with these'),
        'native-backbone-kv-heads-a-string': ('backbone_args', 'two', 'backbone_args.num_kv_heads must be'),
    }
    cases = [HostileRepo('native-as-saved', {'config.json': json.dumps(config).encode(), WEIGHTS: state}, None)]
    cases += [HostileRepo(name, {'config.json': changed(section, value), WEIGHTS: b''}, expected,
                          config_refused=True) for name, (section, value, expected) in bad.items()]
    return cases


def corpus(sentinel: Path) -> List[HostileRepo]:
    """Every hostile repo; ``sentinel`` is the folder a pickle would create if anything unpickled it."""
    return _config_cases() + _weights_cases(sentinel) + _native_cases()


def write_corpus(root: Path, repos: List[HostileRepo]) -> Path:
    """The repos as ``root/ORG/NAME/FILE``, the layout :class:`support.hub_server.HubServer` serves."""
    for repo in repos:
        folder = root / ORG / repo.name
        folder.mkdir(parents=True)
        for name, data in repo.files.items():
            (folder / name).write_bytes(data)
    return root
