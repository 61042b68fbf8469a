"""Finding, loading and caching models by a short spec string, for the app and for scripts.

Specs (see :mod:`gqa_core.lens.specs`): ``embedded/NAME``, ``local:NAME`` (operator-allowed folders only),
``hub:ORG/NAME[@REVISION]``, ``convert:SOURCE:VARIANT:G``. Specs come from strangers: they are parsed strictly,
configs are validated and held to a size :class:`~gqa_core.io.safe_config.Budget` before anything is built, and
no message names a server path.
"""
from __future__ import annotations

import html
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.convert import convert, grouping_config, kv_cache_bytes, source_heads
from ..core.device import full_fp32, resolve_device
from ..core.policies import POLICIES
from ..core.vit import gqa_layers, num_tokens
from ..io.credentials import token_repos as env_token_repos, visitor_token
from ..io.hub import ModelLoadError, from_timm, load_pretrained
from ..io.preprocessing import model_preprocessing
from ..io.safe_config import Budget
from .calibration import calibration_images
from .gpu import on_zerogpu
from .specs import Spec, SpecError, allowed_model_dirs, parse_spec, resolve_in, shown

__all__ = ['short_name', 'LoadedModel', 'ModelRegistry', 'ModelLoadError', 'EMBEDDED_DIR', 'DEFAULT_MODELS', 'parse_spec',
           'SpecError']

EMBEDDED_DIR = Path(__file__).resolve().parents[2] / 'assets' / 'models'
DEFAULT_MODELS = ('embedded/mha', 'embedded/gqa', 'embedded/kdgqa', 'embedded/dgqa-diff')
CALIBRATION_TOKENS = 8_192  # calibration images x tokens the advisor may score for one live conversion
REFINE_FLOPS = 1e12  # the advisor's model-output comparison, per live conversion (about 20 s on 2 CPU cores)


def live_calibration_size(model: nn.Module, most: int = 512) -> int:
    """How many calibration images the grouping advisor scores for one live request (bounded work)."""
    return max(8, min(most, CALIBRATION_TOKENS // num_tokens(model)))


@dataclass
class LoadedModel:
    spec: str
    model: nn.Module
    labels: List[str]
    preprocessing: Dict[str, Any]
    grouping: Dict[str, Any]
    params: int
    kv_cache_bytes: int
    source_heads: Optional[List[List[int]]] = None  # advised grouping: MHA head at each head position, per layer
    trained_on: Optional[str] = None  # what its config says it was trained on (None: not stated)
    lock: threading.Lock = field(default_factory=threading.Lock)  # recording attaches to the model: one at a time

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def summary(self) -> str:
        g = self.grouping
        head = ' · features only (no classifier head)' if self.model.num_classes == 0 else ''
        head += ' · advised head grouping (hover the assignment for source heads)' if self.source_heads else ''
        return (f"**{short_name(self.spec)}** — {g['variant'].upper()}, G = {g['num_kv_heads']} of "
                f"{self.model.blocks[0].attn.num_heads} heads · {self.params:,} params · "
                f"K/V cache {self.kv_cache_bytes / 1024:.0f} KiB / image (fp16){head}\n\n{self.knows()}")

    def knows(self) -> str:
        """What the model knows, from its config: its training data, its classes, the input it sees."""
        _, height, width = self.preprocessing['input_size']
        data = f'trained on **{self.trained_on}**' if self.trained_on else 'training data not stated by its config'
        classes = 'features only' if self.model.num_classes == 0 else f'{self.model.num_classes:,} classes'
        return f'{data} · {classes} · sees {height} × {width} px'


def short_name(spec: str, limit: int = 36) -> str:
    """``spec`` for a narrow column: whole when short, else cut with the full name on hover (HTML-escaped)."""
    if len(spec) <= limit:
        return html.escape(spec)
    return f'<abbr title="{html.escape(spec, quote=True)}">{html.escape(spec[:limit - 1])}…</abbr>'


def _imagenet_labels(num_classes: int) -> List[str]:
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f'class {i}' for i in range(num_classes)]


class ModelRegistry:
    """Loads models by spec and keeps the most recently used ones, bounded by count and parameter bytes.

    ``model_dirs``: folders whose model sub-folders ``local:NAME`` may name (besides ``GQA_LENS_MODEL_DIRS``);
    ``budget``: the largest model a config may describe (default: :meth:`Budget.from_env`); ``token_repos``:
    the Hub repos whose downloads may carry the server's token (default ``GQA_LENS_TOKEN_REPOS``; every other
    download a spec causes carries none); ``device``: where models run (:func:`~gqa_core.core.device.resolve_device`:
    ``GQA_LENS_DEVICE``, else CUDA when there is one).
    """

    def __init__(self, embedded_dir: Path = EMBEDDED_DIR, max_models: int = 8, max_bytes: int = 2 * 2**30,
                 model_dirs: Sequence[str] = (), budget: Optional[Budget] = None,
                 token_repos: Optional[Sequence[str]] = None, device: Optional[str] = None) -> None:
        self.embedded_dir = Path(embedded_dir)
        # where loaded models live: the CPU on a ZeroGPU Space (its GPU exists only inside the GPU call)
        self.device = torch.device('cpu') if on_zerogpu() else resolve_device(device)
        full_fp32(self.device)
        self.model_dirs = allowed_model_dirs(model_dirs)
        self.budget = budget or Budget.from_env()
        self.token_repos = tuple(token_repos) if token_repos is not None else env_token_repos()
        self.max_models, self.max_bytes = max_models, max_bytes
        self._cache: 'OrderedDict[str, LoadedModel]' = OrderedDict()
        self._lock = threading.Lock()

    def embedded(self) -> List[str]:
        if not self.embedded_dir.is_dir():
            return []
        return [f'embedded/{p.name}' for p in sorted(self.embedded_dir.iterdir()) if (p / 'config.json').is_file()]

    def local(self) -> List[str]:
        names = {p.name for d in self.model_dirs for p in d.iterdir() if (p / 'config.json').is_file()}
        return [f'local:{n}' for n in sorted(names)]

    def _folder(self, spec: Spec) -> Path:
        folders = [self.embedded_dir] if spec.kind == 'embedded' else self.model_dirs
        for folder in folders:
            path = resolve_in(folder, spec.name)
            if path is not None:
                return path
        available = self.embedded() if spec.kind == 'embedded' else self.local()
        raise SpecError(f'no model {shown(str(spec))}; available: {", ".join(available) or "none"}')

    def _load_saved(self, spec: Spec) -> tuple:
        """``(model, what its config says it was trained on)``."""
        if spec.kind == 'hub':
            token = visitor_token(spec.name, self.token_repos)
            return load_pretrained(spec.name, spec.revision, local=False, budget=self.budget, token=token)
        path = self._folder(spec)
        try:
            return load_pretrained(str(path), budget=self.budget)
        except ModelLoadError as e:  # name the spec, never the server path
            raise ModelLoadError(str(e).replace(str(path), str(spec))) from None

    def _load(self, text: str) -> LoadedModel:
        spec = parse_spec(text, tuple(POLICIES))
        trained_on = None
        if spec.kind != 'convert':
            model, trained_on = self._load_saved(spec)
        else:
            source = spec.source
            if source.kind in ('embedded', 'local', 'hub'):
                model, trained_on = self._load_saved(source)
            else:
                name = f'hf-hub:{source.name}' + (f'@{source.revision}' if source.revision else '') \
                    if source.kind == 'hf-hub' else source.name
                model = from_timm(name, 'mha', budget=self.budget,
                                  token=lambda repo: visitor_token(repo, self.token_repos))
            calibration = None
            if spec.grouping != 'consecutive':
                calibration = calibration_images(model_preprocessing(model), live_calibration_size(model))
            convert(model, spec.variant, spec.num_kv_heads, grouping=spec.grouping, calibration=calibration,
                    max_refine_flops=REFINE_FLOPS)
        model.eval().to(self.device)
        labels = model.pretrained_cfg.get('label_names')
        if labels is None or len(labels) != model.num_classes:
            labels = _imagenet_labels(model.num_classes)
        preprocessing = model_preprocessing(model)
        return LoadedModel(str(spec), model, list(labels), preprocessing, grouping_config(model),
                           sum(p.numel() for p in model.parameters()), kv_cache_bytes(model), source_heads(model),
                           trained_on)

    def get(self, spec: str, progress: Optional[Callable[[str], None]] = None) -> LoadedModel:
        spec = str(parse_spec(spec, tuple(POLICIES)))  # canonical key; refuses bad specs before any work
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

    def known_geometry(self, text: str) -> Optional[Tuple[int, int]]:
        """``(layers, heads)`` of the model ``text`` names when that is known without downloading or converting
        anything: a model already loaded, or an embedded / local model (a conversion has its source's geometry).
        None otherwise, and for text that is not a spec."""
        try:
            spec = parse_spec(text, tuple(POLICIES))
        except ValueError:
            return None
        with self._lock:
            loaded = self._cache.get(str(spec))
        if loaded is None:
            source = spec.source if spec.kind == 'convert' else spec
            if source.kind not in ('embedded', 'local'):
                return None
            try:
                loaded = self.get(str(source))
            except (ValueError, OSError, RuntimeError):
                return None
        layers = gqa_layers(loaded.model)
        return (len(layers), layers[0].num_heads) if layers else None
