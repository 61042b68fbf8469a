"""Finding, loading and caching models by a short spec string, for the app and for scripts.

Specs:
    ``embedded/kdgqa``                      a model shipped in ``assets/models`` (works offline)
    ``hub:org/repo``                         a saved GQA Lens model on the Hub (or a local folder)
    ``convert:SOURCE:VARIANT:G``             training-free conversion; SOURCE is ``embedded/mha``, a
                                             ``hf-hub:timm/...`` id or a timm model name
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .convert import convert, grouping_config, kv_cache_bytes
from .hub import ModelLoadError, from_pretrained, from_timm

__all__ = ['LoadedModel', 'ModelRegistry', 'ModelLoadError', 'EMBEDDED_DIR', 'DEFAULT_MODELS', 'parse_spec']

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / 'assets' / 'models'
DEFAULT_MODELS = ('embedded/mha', 'embedded/gqa', 'embedded/kdgqa', 'embedded/dgqa-diff')


@dataclass
class LoadedModel:
    spec: str
    model: nn.Module
    labels: List[str]
    preprocessing: Dict[str, Any]
    grouping: Dict[str, Any]
    params: int
    kv_cache_bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # recording attaches to the model: one at a time

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def summary(self) -> str:
        g = self.grouping
        return (f"**{self.spec}** — {g['variant'].upper()}, G = {g['num_kv_heads']} of "
                f"{self.model.blocks[0].attn.num_heads} heads · {self.params:,} params · "
                f"K/V cache {self.kv_cache_bytes / 1024:.0f} KiB / image (fp16)")


def parse_spec(spec: str) -> Dict[str, Any]:
    spec = (spec or '').strip()
    if not spec:
        raise ValueError('no model chosen')
    if spec.startswith('embedded/'):
        return dict(kind='embedded', name=spec.split('/', 1)[1])
    if spec.startswith('hub:'):
        return dict(kind='hub', repo=spec[4:])
    if spec.startswith('convert:'):
        parts = spec[len('convert:'):].rsplit(':', 2)
        if len(parts) != 3:
            raise ValueError(f'{spec!r}: expected convert:SOURCE:VARIANT:G')
        source, variant, g = parts
        try:
            G = int(g)
        except ValueError:
            raise ValueError(f'{spec!r}: G must be an integer, got {g!r}') from None
        return dict(kind='convert', source=source, variant=variant, G=G)
    raise ValueError(f'unknown model spec {spec!r}: use embedded/NAME, hub:ORG/REPO or convert:SOURCE:VARIANT:G')


def _imagenet_labels(num_classes: int) -> List[str]:
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f'class {i}' for i in range(num_classes)]


class ModelRegistry:
    """Loads models by spec and keeps the most recently used ones, bounded by count and parameter bytes."""

    def __init__(self, embedded_dir: Path = EMBEDDED_DIR, max_models: int = 8, max_bytes: int = 2 * 2**30) -> None:
        self.embedded_dir = Path(embedded_dir)
        self.max_models, self.max_bytes = max_models, max_bytes
        self._cache: 'OrderedDict[str, LoadedModel]' = OrderedDict()
        self._lock = threading.Lock()

    def embedded(self) -> List[str]:
        if not self.embedded_dir.is_dir():
            return []
        return [f'embedded/{p.name}' for p in sorted(self.embedded_dir.iterdir()) if (p / 'config.json').is_file()]

    def _embedded_path(self, name: str) -> str:
        path = self.embedded_dir / name
        if not (path / 'config.json').is_file():
            raise ValueError(f'no embedded model {name!r}; available: {", ".join(self.embedded()) or "none"}')
        return str(path)

    def _load(self, spec: str) -> LoadedModel:
        parsed = parse_spec(spec)
        if parsed['kind'] == 'embedded':
            model = from_pretrained(self._embedded_path(parsed['name']))
        elif parsed['kind'] == 'hub':
            model = from_pretrained(parsed['repo'])
        else:
            source = parsed['source']
            if source.startswith('embedded/'):
                model = from_pretrained(self._embedded_path(source.split('/', 1)[1]))
                base_config = model.gqa_lens_config
                convert(model, parsed['variant'], parsed['G'])
                model.gqa_lens_config = base_config
            else:
                model = from_timm(source, parsed['variant'], parsed['G'])
        model.eval()
        config = getattr(model, 'gqa_lens_config', None)
        if config is not None:
            labels = config.get('labels') or _imagenet_labels(model.num_classes)
            preprocessing = config['preprocessing']
        else:
            import timm
            labels = _imagenet_labels(model.num_classes)
            preprocessing = {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in timm.data.resolve_data_config({}, model=model).items()}
        return LoadedModel(spec, model, list(labels), preprocessing, grouping_config(model),
                           sum(p.numel() for p in model.parameters()), kv_cache_bytes(model))

    def get(self, spec: str, progress: Optional[Callable[[str], None]] = None) -> LoadedModel:
        spec = spec.strip()
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        if progress is not None:
            progress(f'loading {spec}')
        with torch.inference_mode(False):
            loaded = self._load(spec)
        with self._lock:
            self._cache[spec] = loaded
            self._cache.move_to_end(spec)
            while len(self._cache) > self.max_models or (
                    len(self._cache) > 1 and sum(m.num_bytes for m in self._cache.values()) > self.max_bytes):
                self._cache.popitem(last=False)
        return loaded

