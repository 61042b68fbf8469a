"""The app's MCP tools: what an agent asks GQA Lens, answered as JSON text instead of pictures.

Gradio builds an MCP tool from each documented event function (its docstring's ``Args:`` describe the tool's
parameters), served at ``/gradio_api/mcp/`` when the app launches with ``mcp_server=True`` (``GQA_LENS_MCP``).
The four here run the same code, under the same limits, as the web page: the same spec parser, image loader,
model budgets, live head-order advisor and live KV budget, and a refusal is the page's one line
(:func:`~gqa_core.lens.specs.public_message`, raised as ``gr.Error``). Each returns one JSON document as text,
because gradio hands an MCP client a ``str()`` of what the endpoint returns: a JSON string stays JSON.

The page's own endpoints (``/run``, ``/pick``, ``/export``, ``/predict``, ``/kv_budget``) return pictures, figures
and session state an agent cannot use; :func:`page_only` keeps them off the tool list.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Dict, List, Optional

import gradio as gr
import numpy as np

from ..core.convert import check_kv_as_built
from ..core.head_order import head_groups
from .analysis import Analysis, analyse
from .explorer import live_kv_budget
from .images import ImageInputError, load_image
from .models import ModelLoadError, ModelRegistry, live_head_order, live_calibration_size
from .specs import MAX_G, MAX_SPEC_CHARS, public_message, shown
from .views import MAX_MODELS, NO_MODEL, run_models

__all__ = ['LensTools', 'page_only', 'analysis_json', 'TOOL_NAMES', 'DECIMALS', 'MODEL_SEPARATOR']

TOOL_NAMES = ('predict', 'analyse', 'advise_grouping', 'kv_budget')  # what an MCP client lists
DECIMALS = 5  # attention weights and shares in the JSON: 1e-5 is far below what any view can show
MODEL_SEPARATOR = ','  # between the specs of ``analyse`` (no spec can contain it: see gqa_core.lens.specs)


def page_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as an event function that stays an API endpoint of the page but is not an MCP tool (gradio 6.31
    lists as tools only the functions whose ``_mcp_type`` is unset or ``"tool"``; ``test_mcp`` checks the list)."""
    @functools.wraps(fn)
    def event(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
    event._mcp_type = 'page'  # type: ignore[attr-defined]
    return event


def _rounded(array: Any) -> Any:
    """A numpy array (or tensor) as nested lists of floats rounded to :data:`DECIMALS`; null where there is no
    value (NaN: a KV head a block does not have, where blocks differ in G)."""
    values = np.round(np.asarray(array, dtype=np.float64), DECIMALS)
    return np.where(np.isfinite(values), values, None).tolist()


def analysis_json(analysis: Analysis) -> Dict[str, Any]:
    """What one model did with the image, as plain JSON values: the top-5, the grouping, per layer the query
    heads each KV head served (allocation), the key-norm shares the policy apportioned by, the key norms and
    the idle KV heads, and the summary rows' attention to every patch per layer and head."""
    rec = analysis.recording
    layers = [dict(layer=i, allocation=[int(a) for a in layer.allocation[0]],  # each block's own G
                   key_norm_shares=_rounded(layer.shares[0]), key_norms=_rounded(layer.key_norms[0]),
                   idle_kv_heads=[g for g, a in enumerate(layer.allocation[0]) if a == 0])
              for i, layer in enumerate(rec.layers)]
    out: Dict[str, Any] = dict(
        model=analysis.spec,
        top5=[dict(label=label, probability=round(float(p), DECIMALS)) for label, p in analysis.top5],
        grouping=analysis.grouping, num_layers=len(rec.layers), num_heads=analysis.num_heads,
        source_heads=analysis.source_heads, notes=list(analysis.notes), layers=layers,
        summary_rows=dict(of=analysis.summary_label, grid=[int(s) for s in rec.grid_size],
                          attention=_rounded(analysis.summary_rows)))
    if analysis.ablation is not None:  # which KV heads matter: the drop of the score when each is removed
        out['kv_head_ablation'] = {mode: _rounded(drop) for mode, drop in analysis.ablation.kv.items()}
    if analysis.deep_note:
        out['deep_note'] = analysis.deep_note
    return out


def _whole(value: Any, what: str) -> int:
    """A whole number from a client (any JSON value), else one line saying so; its range is checked where the
    page checks it, so that both refuse with the same line."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number == int(number)):
        raise gr.Error(f'{what} must be an integer, got {shown(str(value), 20)}')
    return int(number)


def _specs(models: Any) -> List[str]:
    """The model specs of ``analyse``: 1 to :data:`MAX_MODELS`, comma-separated, each at most a spec's length."""
    text = str(models or '')
    if len(text) > MAX_MODELS * (MAX_SPEC_CHARS + 1):
        raise gr.Error(f'models is {len(text):,} characters; the limit is {MAX_MODELS} specs of '
                       f'{MAX_SPEC_CHARS} characters')
    specs = [s.strip() for s in text.split(MODEL_SEPARATOR) if s.strip() not in ('', NO_MODEL)]
    if not 1 <= len(specs) <= MAX_MODELS:
        raise gr.Error(f'give 1 to {MAX_MODELS} model specs separated by commas, got {len(specs)}')
    return specs


def _json(value: Dict[str, Any]) -> str:
    return json.dumps(value, allow_nan=False)


class LensTools:
    """The MCP tools of one served app, on its model registry (so they share its cache and its budgets).

    Args:
        registry: the app's :class:`~gqa_core.lens.models.ModelRegistry`.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def top5(self, image: Optional[str], model: str) -> Analysis:
        """One model's analysis of one image with a top-5, or the one-line refusal /predict and this tool share.

        Args:
            image: the image's path (an upload), checked by the guarded loader.
            model: a model spec.
        """
        try:
            analysis = analyse(self.registry.get(model), load_image(image).image)
        except (ImageInputError, ModelLoadError, ValueError) as e:
            raise gr.Error(public_message(e)) from None
        except (OSError, RuntimeError, TypeError, IndexError, KeyError, AttributeError) as e:
            # what a model's own code raises: named in one line, as /run names it (never gradio's generic error)
            raise gr.Error(public_message(f'{shown(str(model), 40)}: {type(e).__name__}: {e}'.splitlines()[0])) \
                from None
        if not analysis.top5:
            raise gr.Error(f'{analysis.spec} has no classifier head (features only): nothing to predict')
        return analysis

    def predict(self, image: Optional[str], model: str) -> str:
        """The five most likely classes of one image for one GQA Lens model.

        Args:
            image: the image (JPEG, PNG, WebP, ...; at most 50 MB and 50 megapixels).
            model: a model spec: embedded/NAME, local:NAME, hub:ORG/NAME or convert:SOURCE:VARIANT:G[:ORDER][:INIT].

        Returns:
            JSON text: {"model": the canonical spec, "top5": [{"label", "probability"}, ...]}.
        """
        analysis = self.top5(image, model)
        return _json(dict(model=analysis.spec, top5=analysis_json(analysis)['top5']))

    def analyse(self, image: Optional[str], models: str, ablation: bool = False) -> str:
        """How one to four GQA Lens models attend to one image: predictions, how many query heads each shared KV
        head served in every layer, the key-norm shares that allocation follows, the idle KV heads, and the
        summary rows' attention to every patch.

        Args:
            image: the image (JPEG, PNG, WebP, ...; at most 50 MB and 50 megapixels).
            models: 1 to 4 model specs separated by commas, e.g. "embedded/mha, convert:embedded/mha:gqa:2".
            ablation: also remove each KV head in turn and report the drop of the top class's score (slower).

        Returns:
            JSON text: {"models": [one entry per spec, in order: either the analysis (model, top5, grouping,
            layers [{layer, allocation, key_norm_shares, key_norms, idle_kv_heads}], summary_rows {of, grid,
            attention [layer][head][patch]}, ...) or {"model", "error"}]}.
        """
        specs = _specs(models)
        try:
            analyses, errors, notes = run_models(self.registry, image, specs, deep=bool(ablation))
        except (ImageInputError, ValueError) as e:
            raise gr.Error(public_message(e)) from None
        if all(a is None for a in analyses):  # nothing ran: the page's status line, as one refusal
            raise gr.Error(' · '.join(e for e in errors if e))
        return _json(dict(models=[analysis_json(a) if a is not None else dict(model=spec, error=error)
                                  for spec, a, error in zip(specs, analyses, errors)], image_notes=list(notes)))

    def advise_grouping(self, model: str, num_kv_heads: float) -> str:
        """Which heads of a model should share each of G KV heads, layer by layer: the head-order
        advisor that convert:MODEL:VARIANT:G:output-error uses, with the same live budgets, on the shipped
        CIFAR-10 images.

        Args:
            model: the spec of a multi-head (MHA) model, e.g. embedded/mha or hub:ORG/NAME, or of one that
                shares the K/V heads it was built with (timm's GQA ViTs, e.g. Sapiens2).
            num_kv_heads: G, the number of KV heads, a divisor of the model's heads.

        Returns:
            JSON text: {"model", "num_kv_heads", "num_heads", "calibration_images", "spec" (the conversion that
            uses this grouping), "layers": [{layer, groups (query heads per KV head), order, error_consecutive,
            error_advised, search, output_divergence}]}.
        """
        g = _whole(num_kv_heads, 'G')
        if not 1 <= g <= MAX_G:  # the limit, and the line, of a convert: spec's G
            raise gr.Error(f'G must be an integer 1..{MAX_G}, got {shown(str(g))}')
        try:
            loaded = self.registry.get(model)
            check_kv_as_built(loaded.model, loaded.spec, 'the advisor')
            with loaded.lock:  # the advisor runs the shared model's blocks: one user at a time
                advice = live_head_order(loaded.model, g)
        except (ModelLoadError, ValueError, OSError, RuntimeError) as e:
            raise gr.Error(public_message(e)) from None
        layers = [dict(layer=i, groups=head_groups(order, g), order=list(order),
                       error_consecutive=advice.error_consecutive[i], error_advised=advice.error_advised[i],
                       search=advice.search[i], output_divergence=advice.output_divergence[i])
                  for i, order in enumerate(advice.permutations)]
        return _json(dict(model=loaded.spec, num_kv_heads=g, num_heads=len(advice.permutations[0]),
                          calibration_images=live_calibration_size(loaded.model),
                          spec=f'convert:{loaded.spec}:gqa:{g}:output-error', layers=layers))

    def kv_budget(self, model: str, images: float = 64) -> str:
        """Accuracy against K/V cache bytes for every number of KV heads of a multi-head model, training-free:
        GQA and KDGQA, consecutive and advised head order, on the shipped CIFAR-10 images (the KV budget tab).
        A model that shares K/V heads as it was built (timm's Sapiens2) is explored from its exact multi-head
        expansion, and its own row has variant "native".

        Args:
            model: a multi-head (MHA) model spec, e.g. embedded/mha, or one of a model as built.
            images: how many shipped images to evaluate on, 1 to 256.

        Returns:
            JSON text: {"model", "n", "num_heads", "rows": [{num_kv_heads (an int, or one per block for the
            native row), variant, head_order, init, kv_bytes, top1 (null when the model's classes are not
            CIFAR-10's), agreement (with the MHA's top-1)}]}.
        """
        n = _whole(images, 'number of images')  # live_kv_budget refuses what the page's tab refuses
        try:
            result = live_kv_budget(self.registry, model, n)
        except (ModelLoadError, ValueError, OSError, RuntimeError) as e:
            raise gr.Error(public_message(e)) from None
        return _json(result)
