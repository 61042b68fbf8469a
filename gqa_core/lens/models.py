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

from ..core.calibrate import CalibrationBudget, CalibrationReport, block_flops
from ..core.convert import check_convertible, convert, kv_cache_bytes, kv_heads_label
from ..core.head_order import HeadOrderAdvice, advise_head_order
from ..core.device import full_fp32, resolve_device
from ..core.policies import POLICIES
from ..core.settings import EMBEDDED_DIR
from ..core.vit import blocks_of, gqa_layers, num_tokens
from ..io.credentials import token_repos as env_token_repos, visitor_token
from ..io.config import GQALensConfig
from ..io.hub import ModelLoadError, from_timm, load_config, load_pretrained
from ..io.preprocessing import model_preprocessing
from ..io.safe_config import Budget
from .calibration import calibration_images
from .gpu import on_zerogpu
from .specs import Spec, SpecError, allowed_model_dirs, parse_spec, resolve_in, shown

__all__ = ['short_name', 'live_head_order', 'LoadedModel', 'HUB_SOURCES', 'hub_note', 'hub_reachable', 'ModelRegistry', 'ModelLoadError', 'EMBEDDED_DIR', 'DEFAULT_MODELS', 'parse_spec',
           'SpecError']

DEFAULT_MODELS = ('embedded/mha', 'embedded/gqa', 'embedded/kdgqa', 'embedded/dgqa-diff')
CALIBRATION_TOKENS = 8_192  # calibration images x tokens the advisor may score for one live conversion
REFINE_FLOPS = 1e12  # the advisor's model-output comparison, per live conversion (about 20 s on 2 CPU cores)
FIT_FLOPS = 1e11  # forward FLOPs over the images one live calibrated conversion fits on (all 512 at 32 px)
# One live calibrated conversion: a visitor cannot raise it (the spec has no budget part). 4e12 FLOPs of
# optimisation is about 45 s on 2 CPU cores; large models get fewer steps a layer (or the closed form only).
LIVE_CALIBRATION = CalibrationBudget(steps=300, max_flops=4e12)
CALIBRATION_DATA = 'the shipped CIFAR-10 training images'
# What the FLOP cap above does not count: the passes over the fit images (the MHA target, the mean-pooled
# baseline, the closed form, the checks, the report: about this many forwards), bounded by refusing the spec.
CALIBRATION_PASSES = 8
LIVE_PASS_FLOPS = 2e13  # about 3 minutes on 2 CPU cores; DINOv2-S at 518 px needs 6e12, ViT-L at 518 px is refused
# Real Hub ViTs of different families a visitor can convert without typing a repo id (timm format, within the
# default budget): DeiT, DINOv2 with registers (518 px), DINOv3 (RoPE), SigLIP (attention pooling), EVA-02.
HUB_SOURCES = (
    'hf-hub:timm/deit_small_patch16_224.fb_in1k',
    'hf-hub:timm/vit_small_patch14_reg4_dinov2.lvd142m',
    'hf-hub:timm/vit_small_patch16_dinov3.lvd1689m',
    'hf-hub:timm/vit_base_patch16_siglip_224.webli',
    'hf-hub:timm/eva02_tiny_patch14_336.mim_in22k_ft_in1k',
)
HUB_TIMEOUT = 3.0  # seconds the reachability check waits for the Hub


def live_calibration_size(model: nn.Module, most: int = 512) -> int:
    """How many calibration images the head-order advisor scores for one live request (bounded work)."""
    return max(8, min(most, CALIBRATION_TOKENS // num_tokens(model)))


def live_head_order(model: nn.Module, num_kv_heads: int, images: Optional[torch.Tensor] = None) -> HeadOrderAdvice:
    """The head-order advisor within one live request's budgets: :func:`live_calibration_size` of the shipped
    images (or the first that many of ``images``, already preprocessed) and :data:`REFINE_FLOPS` of output
    comparison. Every live caller (an ``output-error`` conversion, the MCP tool) goes through here, so none can
    ask for more work than another.

    Args:
        model: the multi-head ViT to advise (unchanged).
        num_kv_heads: G, a divisor of its heads.
        images: preprocessed calibration images to take the budgeted prefix from; None: the shipped ones.
    """
    check_convertible(model, num_kv_heads)
    size = live_calibration_size(model)
    images = calibration_images(model_preprocessing(model), size) if images is None else images
    return advise_head_order(model, num_kv_heads, images[:size], max_refine_flops=REFINE_FLOPS)


def forward_flops(model: nn.Module) -> float:
    """Forward FLOPs of ``model``'s blocks for one image at its own input size."""
    tokens = num_tokens(model)
    return sum(block_flops(b, tokens) for b in blocks_of(model))


def live_fit_size(model: nn.Module, most: int = 512) -> int:
    """How many calibration images one live calibrated conversion fits on: as many as one forward of
    :data:`FIT_FLOPS` covers (512 for the embedded family, about 10 for a ViT-S at 224 px), at least 8."""
    return max(8, min(most, int(FIT_FLOPS // forward_flops(model))))


@dataclass
class LoadedModel:
    """A model the registry holds, with its typed config (validated at load, or read once from a model converted
    here) and what the app shows about it."""
    spec: str
    model: nn.Module
    config: GQALensConfig
    labels: List[str]
    preprocessing: Dict[str, Any]
    params: int
    kv_cache_bytes: int
    calibration: Optional[CalibrationReport] = None  # what calibration did, when it was calibrated here
    lock: threading.Lock = field(default_factory=threading.Lock)  # recording attaches to the model: one at a time

    @property
    def grouping(self) -> Dict[str, Any]:
        """The policy, G and its options (``config.json``'s ``grouping``)."""
        return self.config.grouping.to_dict()

    @property
    def source_heads(self) -> Optional[List[List[int]]]:
        """Advised head order: the MHA head at each head position, per layer (None: consecutive)."""
        return self.config.source_heads

    @property
    def trained_on(self) -> Optional[str]:
        return self.config.dataset

    @property
    def conversion(self) -> Optional[Dict[str, Any]]:
        """How its K/V heads were made, when recorded (``config.json``'s ``conversion``)."""
        return self.config.conversion

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def summary(self) -> str:
        g = self.grouping
        head = ' · features only (no classifier head)' if self.model.num_classes == 0 else ''
        head += ' · advised head order (hover the assignment for source heads)' if self.source_heads else ''
        calibrated = self.conversion is not None and self.conversion.get('init') == 'calibrated'
        head += f' · {calibrated_words(self.conversion)}' if calibrated else ''
        return (f"**{short_name(self.spec)}** — {g['variant'].upper()}, G = {kv_heads_label(g['num_kv_heads'])} of "
                f"{blocks_of(self.model)[0].attn.num_heads} heads · {self.params:,} params · "
                f"K/V cache {self.kv_cache_bytes / 1024:.0f} KiB / image (fp16){head}\n\n{self.knows()}")

    def knows(self) -> str:
        """What the model knows, from its config: its training data, its classes, the input it sees."""
        _, height, width = self.preprocessing['input_size']
        data = f'trained on **{self.trained_on}**' if self.trained_on else 'training data not stated by its config'
        classes = 'features only' if self.model.num_classes == 0 else f'{self.model.num_classes:,} classes'
        return f'{data} · {classes} · sees {height} × {width} px'


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether this server can reach the Hugging Face Hub now (``HF_ENDPOINT``; never when ``HF_HUB_OFFLINE``).
    One small anonymous request: no token is sent."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    import httpx
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
        return True
    except httpx.HTTPError:
        return False


def hub_note(source: Optional[str]) -> str:
    """The line the conversion builder shows for a chosen source: at once, whether a Hub source can load."""
    try:
        spec = parse_spec(f'convert:{source}:gqa:1', tuple(POLICIES)).source
    except SpecError as e:
        return f'⚠️ {e}'
    if spec.kind not in ('hub', 'hf-hub', 'timm'):
        return ''
    if not hub_reachable():
        return '⚠️ the Hugging Face Hub cannot be reached from this server: Hub models will not load here'
    return 'downloaded from the Hub on first use, then converted (large models take a while)'


def calibrated_words(conversion: Dict[str, Any]) -> str:
    """'calibrated on 512 images in 41 s' (from a config's or a live conversion's record)."""
    seconds = conversion.get('seconds')
    took = f' in {seconds:.0f} s' if isinstance(seconds, (int, float)) else ''
    return f"K/V calibrated on {conversion.get('images', '?')} images{took}"


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

    def _load_saved(self, spec: Spec) -> Tuple[nn.Module, GQALensConfig]:
        if spec.kind == 'hub':
            token = visitor_token(spec.name, self.token_repos)
            return load_pretrained(spec.name, spec.revision, local=False, budget=self.budget, token=token)
        path = self._folder(spec)
        try:
            return load_pretrained(str(path), budget=self.budget)
        except ModelLoadError as e:  # name the spec, never the server path
            raise ModelLoadError(str(e).replace(str(path), str(spec))) from None

    @staticmethod
    def _convert(model: nn.Module, spec: Spec, progress: Optional[Callable[[str], None]]) -> None:
        """``spec``'s conversion of ``model``, within the live budgets (the advisor's, calibration's): the shipped
        images through the model's own preprocessing."""
        check_convertible(model, spec.kv_heads)
        advised, calibrated = spec.head_order != 'consecutive', spec.init == 'calibrated'
        fit_size = live_fit_size(model) if calibrated else 0
        if calibrated:  # refused before any image is decoded or any head is advised
            passes = fit_size * forward_flops(model) * CALIBRATION_PASSES
            if passes > LIVE_PASS_FLOPS:
                raise ValueError(f'{shown(str(spec))}: too large to calibrate live (about {passes:.1e} FLOPs of '
                                 f'passes, the limit is {LIVE_PASS_FLOPS:.0e}); calibrate it with python -m '
                                 'gqa_core.convert and load the saved model')
        advise_size = live_calibration_size(model) if advised else 0
        images = calibration_images(model_preprocessing(model), max(advise_size, fit_size)) \
            if advised or calibrated else None  # both sets are prefixes of the shipped images: decoded once
        order: Any = spec.head_order
        if advised:  # the advisor on its own bounded image set
            order = live_head_order(model, spec.kv_heads, images[:advise_size]).permutations
        fit = images[:fit_size] if calibrated else None
        report = None if progress is None else (lambda f, what: progress(f'{spec}: {what}'))
        convert(model, spec.variant, spec.kv_heads, head_order=order, calibration=fit, init=spec.init,
                budget=LIVE_CALIBRATION, progress=report)
        if model.gqa_conversion is not None:
            model.gqa_conversion['data'] = CALIBRATION_DATA

    def _load(self, text: str, progress: Optional[Callable[[str], None]] = None) -> LoadedModel:
        spec = parse_spec(text, tuple(POLICIES))
        if spec.kind != 'convert':
            model, config = self._load_saved(spec)
        else:
            source = spec.source
            trained_on = None
            if source.kind in ('embedded', 'local', 'hub'):
                model, source_config = self._load_saved(source)
                trained_on = source_config.dataset
            else:
                name = f'hf-hub:{source.name}' + (f'@{source.revision}' if source.revision else '') \
                    if source.kind == 'hf-hub' else source.name
                # as multi-head layers, or for ``:native`` with the KV heads timm built each block with
                model = from_timm(name, 'mha' if spec.kv_heads is not None else 'gqa', budget=self.budget,
                                  token=lambda repo: visitor_token(repo, self.token_repos))
            self._convert(model, spec, progress)
            config = GQALensConfig.of(model, dataset=trained_on)  # once per conversion, then carried
        model.eval().to(self.device)
        labels = model.pretrained_cfg.get('label_names')
        if labels is None or len(labels) != model.num_classes:
            labels = _imagenet_labels(model.num_classes)
        return LoadedModel(str(spec), model, config, list(labels), model_preprocessing(model),
                           sum(p.numel() for p in model.parameters()), kv_cache_bytes(model),
                           getattr(model, 'calibration_report', None))

    def get(self, spec: str, progress: Optional[Callable[[str], None]] = None) -> LoadedModel:
        spec = str(parse_spec(spec, tuple(POLICIES)))  # canonical key; refuses bad specs before any work
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        if progress is not None:
            progress(f'loading {spec}')
        with torch.inference_mode(False):
            loaded = self._load(spec, progress)
        with self._lock:
            self._cache[spec] = loaded
            self._cache.move_to_end(spec)
            while len(self._cache) > self.max_models or (
                    len(self._cache) > 1 and sum(m.num_bytes for m in self._cache.values()) > self.max_bytes):
                self._cache.popitem(last=False)
        return loaded

    def known_geometry(self, text: str) -> Optional[Tuple[int, int]]:
        """``(layers, heads)`` of the model ``text`` names when that is known without building, downloading or
        converting anything: a model already loaded, or what an embedded / local model's config states (a
        conversion has its source's geometry). None otherwise, and for text that is not a spec."""
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
                return load_config(str(self._folder(source)), budget=self.budget).geometry
            except (ValueError, OSError):
                return None
        layers = gqa_layers(loaded.model)
        return (len(layers), layers[0].num_heads) if layers else None
