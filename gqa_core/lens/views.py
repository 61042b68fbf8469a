"""What the app does, without the app: run several models on one image and turn the results into views.

Kept apart from ``app.py`` (layout and wiring only) so it can be called and tested directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import figures
from .analysis import Analysis, Pooling, analyse
from .conversion_error import conversion_error_caption, conversion_error_figure
from .heads import group_diversity
from .images import load_image
from .models import ModelRegistry, short_name
from .geometry import geometry_caption, geometry_figure, group_geometry
from .hover import HOVER_MAX_BYTES, hover_html, hover_maps
from .pick import SIDES, parse_query, pick_caption, pick_figure, picked_maps
from .specs import public_message, shown

__all__ = ['MAX_MODELS', 'NO_MODEL', 'View', 'VIEWS', 'VIEW_LABELS', 'Choice', 'Rendered', 'Header', 'run_models',
           'header', 'render', 'reference_for', 'head_label', 'layer_index', 'column_width', 'COLUMN_WIDTH']

MAX_MODELS = 4
NO_MODEL = '(none)'  # the choice that leaves a column empty


def _is_empty(spec: Optional[str]) -> bool:
    return not spec or not spec.strip() or spec.strip() == NO_MODEL


@dataclass(frozen=True)
class View:
    """One analysis a visitor can look at. ``name`` also names its file in the export; ``picture``: drawn as
    an image (PNG) rather than a plotly figure; ``controls``: the choices it reads (layer, head, fusion, mode)."""
    name: str
    label: str
    picture: bool = False
    controls: Tuple[str, ...] = ()


VIEWS: Dict[str, View] = {v.name: v for v in (
    View('overlay', 'attention', True, ('layer', 'head')),
    View('rollout', 'rollout', True, ('fusion',)),
    View('pool', 'attention pool', True),
    View('grid', 'heads × layers'),
    View('key_norms', 'key norms → allocation'),
    View('assignment', 'query → KV assignment'),
    View('history', 'allocation history', controls=('layer',)),
    View('difference', 'difference vs reference'),
    View('ablation', 'which heads matter', controls=('mode',)),
    View('diversity', 'within-group diversity'),
    View('faithfulness', 'faithfulness'),
    View('conversion', 'where GQA hurts'),
    View('pick', 'picked query', controls=('layer', 'query', 'side')),
    View('geometry', 'query–key geometry', controls=('layer', 'head', 'query')),
)}
VIEW_LABELS = {v.label: v.name for v in VIEWS.values()}


@dataclass(frozen=True)
class Choice:
    """What the visitor chose to look at, and ``width``: the CSS pixels each result column gets."""
    view: str = 'overlay'
    layer: int = 0
    head: str = 'mean'
    fusion: str = 'mean'
    mode: str = 'zero'
    width: int = 640
    query: str = ''  # the picked query: 'x, y' (fractions of the picture), a prefix token's name, or '' (default)
    side: str = 'rows'  # the picked view: where the picked token looks ('rows') or who looks at it ('columns')

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f'view must be one of {tuple(VIEWS)}, got {self.view!r}')
        if self.side not in SIDES.values():
            raise ValueError(f'side must be one of {tuple(SIDES.values())}, got {str(self.side)[:20]!r}')


@dataclass
class Rendered:
    """One model's view: a picture or a figure, and a caption saying what it shows (or, with neither, the one
    line saying why the view does not apply to this model)."""
    caption: str
    picture: Optional[np.ndarray] = None
    figure: Any = None
    html: Optional[str] = None  # a panel the page's script draws (the picked view's instant hover)

    @property
    def applies(self) -> bool:
        return self.picture is not None or self.figure is not None


@dataclass
class Header:
    """What a column shows whatever the view: the summary, the top-5 and the image as the model saw it."""
    summary: str
    top5: Dict[str, float]
    view: np.ndarray  # enlarged by a whole factor (nearest neighbour) so that its pixels show


# What each column of each model count is laid out for: the narrowest column it gets at 1280 px and up.
COLUMN_WIDTH = {1: 1160, 2: 570, 3: 375, 4: 275}


def column_width(num_models: int) -> int:
    return COLUMN_WIDTH[min(max(int(num_models), 1), MAX_MODELS)]


def run_models(registry: ModelRegistry, image_path: Optional[str], specs: Sequence[Optional[str]],
               progress: Any = None, deep: bool = False) -> tuple:
    """Load the image once (safely) and run each chosen model on it.

    Returns ``(analyses, errors, notes)``: ``analyses[i]`` is None where slot ``i`` is empty or failed, and
    ``errors[i]`` then says why. A bad image raises :class:`ImageInputError` before any model runs.
    """
    loaded_image = load_image(image_path)
    deep_spent = 0.0  # TFLOP the run's deep analyses took on the CPU so far: the limit is the run's
    analyses: List[Optional[Analysis]] = []
    errors: List[Optional[str]] = []
    chosen = [s for s in specs if not _is_empty(s)]
    if not chosen:
        raise ValueError('choose at least one model')
    for i, spec in enumerate(specs[:MAX_MODELS]):
        if _is_empty(spec):
            analyses.append(None)
            errors.append(None)
            continue
        k = sum(not _is_empty(s) for s in specs[:i])  # the bar moves over the chosen models only
        try:
            if progress is not None:
                progress((k + 0.5) / len(chosen), desc=f'{shown(spec, 40)}: loading and running')
            step = None if progress is None else (
                lambda what, k=k: progress((k + 0.5) / len(chosen), desc=shown(what, 60)[1:-1]))
            loaded = registry.get(spec, step)  # a calibrated conversion says which layer it is fitting
            deep_step = None if progress is None else (
                lambda fraction, what, k=k, spec=spec: progress((k + 0.5 + 0.5 * fraction) / len(chosen),
                                                                desc=f'{shown(spec, 40)}: {what}'))
            analysis = analyse(loaded, loaded_image.image, deep=deep, progress=deep_step, deep_spent=deep_spent)
            deep_spent += analysis.deep_tflop
            analyses.append(analysis)
            errors.append(None)
        except (ValueError, OSError, RuntimeError, TypeError, IndexError, KeyError, AttributeError) as e:
            # ModelLoadError / SpecError / ConfigError are ValueErrors; anything else from a model is named,
            # never shown as a traceback or with a server path.
            analyses.append(None)
            errors.append(public_message(f'{shown(spec)}: {e}' if not isinstance(e, ValueError)
                                         else f'{shown(spec, 40)}: {e}'))
    plan_pooling(analyses)
    return analyses, errors, loaded_image.notes


def plan_pooling(analyses: Sequence[Optional[Analysis]]) -> None:
    """Give each MHA of a run the pooling its picked view groups heads by: the advised head order of a converted
    model of the run with its depth and heads, else the first such model's G with consecutive heads, else G = H/2
    (pairs, as the paper pools)."""
    for a in analyses:
        if a is None or a.grouping['variant'] != 'mha':
            continue
        heads, depth = a.num_heads, len(a.recording.layers)
        alike = [b for b in analyses if b is not None and b.grouping['variant'] != 'mha' and b.num_heads == heads
                 and len(b.recording.layers) == depth]
        advised = next((b for b in alike if b.source_heads), None)
        if advised is not None:
            a.pooling = Pooling(advised.grouping['num_kv_heads'], f'{advised.spec} (advised head order)',
                                advised.source_heads)
        elif alike:
            a.pooling = Pooling(alike[0].grouping['num_kv_heads'], f'{alike[0].spec} (consecutive heads)')
        elif heads % 2 == 0:
            a.pooling = Pooling(heads // 2, 'pairs of consecutive heads, as the paper mean-pools')


def reference_for(analyses: Sequence[Optional[Analysis]]) -> Optional[Analysis]:
    """The MHA analysis the difference views compare against: the first MHA among the chosen models."""
    return next((a for a in analyses if a is not None and a.grouping['variant'] == 'mha'), None)


def _head_rows(analysis: Analysis, layer: int, head: str) -> np.ndarray:
    rows = analysis.summary_rows[layer]  # (H, patches)
    if head in ('mean', '', None):
        return rows.mean(0)
    h = int(head)
    if not 0 <= h < rows.shape[0]:
        raise ValueError(f'head {h} does not exist: this model has {rows.shape[0]} heads')
    return rows[h]


def head_label(analysis: Analysis, head: Optional[str]) -> str:
    """The head a view of ``analysis`` shows for the choice ``head``: its index, or ``mean`` (the mean over
    heads) when the choice is the mean or a head this model does not have."""
    if head in ('mean', '', None) or not str(head).isdigit() or int(head) >= analysis.num_heads:
        return 'mean'
    return str(int(head))


def header(analysis: Analysis) -> Header:
    return Header(_summary_text(analysis), {label: p for label, p in analysis.top5}, figures.pixelated(analysis.view))


def render(analysis: Analysis, choice: Choice, reference: Optional[Analysis] = None) -> Rendered:
    """``choice.view`` of one model from its compact analysis: no model runs, nothing T x T is touched."""
    return _RENDERERS[choice.view](analysis, choice, reference, figures.Fit(choice.width))


def layer_index(analysis: Analysis, layer: int) -> int:
    return min(max(int(layer), 0), len(analysis.recording.layers) - 1)


def _overlay_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis], fit: figures.Fit) -> Rendered:
    layer, head = layer_index(analysis, choice.layer), head_label(analysis, choice.head)
    picture = figures.overlay(analysis.view, figures.patch_grid(_head_rows(analysis, layer, head),
                                                                analysis.recording.grid_size))
    which = 'mean of the heads' if head == 'mean' else f'head {head}'
    return Rendered(f'{analysis.summary_label} attention, layer {layer}, {which}', picture=picture)


def _rollout_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis], fit: figures.Fit) -> Rendered:
    picture = figures.overlay(analysis.view, figures.patch_grid(analysis.rollout(choice.fusion),
                                                                analysis.recording.grid_size))
    whose = analysis.recording.rollout_label or analysis.summary_label
    return Rendered(f'attention rollout of the {whose} through all layers, heads fused by {choice.fusion}',
                    picture=picture)


def _pool_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis], fit: figures.Fit) -> Rendered:
    rec = analysis.recording
    patches = rec.pool_patches()
    if patches is None:
        return Rendered(f'no attention-pooling head: this model\'s output reads the {analysis.summary_label}')
    heads = rec.pool_attention.shape[1]
    return Rendered(f'the attention-pooling query\'s attention over the patches, mean of its {heads} heads: what '
                    'the pooled output reads', picture=figures.overlay(analysis.view, figures.patch_grid(
                        patches, rec.grid_size)))


def _grid_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis], fit: figures.Fit) -> Rendered:
    return Rendered(f'{analysis.summary_label} attention of every head (columns) in every layer (rows), each tile '
                    'scaled on its own',
                    figure=figures.heads_layers_figure(analysis.summary_rows, analysis.recording.grid_size, fit))


def _key_norms_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                    fit: figures.Fit) -> Rendered:
    rec = analysis.recording
    return Rendered('top: each KV head\'s min-max scaled key norm and the query heads KDGQA would give it; bottom: '
                    'the query heads this model\'s policy gave it',
                    figure=figures.key_norm_figure(rec.stacked('key_norms')[:, 0], rec.stacked('allocation')[:, 0],
                                                   fit))


def _assignment_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                     fit: figures.Fit) -> Rendered:
    rec = analysis.recording
    allocation = rec.stacked('allocation')[:, 0]
    idle = figures.idle_heads(allocation)
    caption = 'the KV head serving each query head, layer by layer; ' + (
        f'idle (serving no query): {", ".join(idle)}' if idle else 'every KV head serves at least one query')
    per_layer = [layer.key_norms.shape[1] for layer in rec.layers]
    if len(set(per_layer)) > 1:
        caption += f'; KV heads by layer: {", ".join(map(str, per_layer))} (the model\'s own blocks differ)'
    return Rendered(caption, figure=figures.assignment_figure(rec.stacked('query_to_kv')[:, 0], allocation, fit,
                                                              source_heads=analysis.source_heads))


def _history_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis], fit: figures.Fit) -> Rendered:
    if analysis.history is None:
        return Rendered('no allocation history: only DGQA recomputes its allocation during training')
    layer = layer_index(analysis, choice.layer)
    hist = analysis.history[layer]
    return Rendered(f'query heads per KV head at every recomputation during training, layer {layer}',
                    figure=figures.allocation_history_figure(hist['steps'], np.array(hist['allocation']), layer,
                                                             fit))


def _difference_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                     fit: figures.Fit) -> Rendered:
    if reference is None:
        return Rendered('no reference: add an MHA model to compare against')
    if reference is analysis:
        return Rendered(f'**{short_name(analysis.spec)}** is the reference the other models are compared with')
    mine, theirs = analysis.summary_rows.mean(1), reference.summary_rows.mean(1)
    try:
        figure = figures.difference_figure(mine, theirs, analysis.recording.grid_size, fit)
    except ValueError as e:
        return Rendered(str(e))
    tv = ' '.join(f'{t:.2f}' for t in figures.total_variation(mine, theirs))
    return Rendered(f'head-mean {analysis.summary_label} attention minus that of the reference '
                    f'**{short_name(reference.spec)}**, one tile per layer (red: more); total variation per layer: '
                    f'{tv}', figure=figure)


def _ablation_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                   fit: figures.Fit) -> Rendered:
    result = analysis.ablation
    if result is None:
        return Rendered(analysis.deep_note)
    if choice.mode not in result.kv:
        raise ValueError(f'ablation mode must be one of {tuple(result.kv)}, got {choice.mode!r}')
    missing = '; grey: a KV head this layer does not have' if np.isnan(result.kv[choice.mode]).any() else ''
    return Rendered(f'drop of the {result.target} score when one head is removed ({choice.mode} ablation){missing}',
                    figure=figures.ablation_figure(result.kv[choice.mode], result.query[choice.mode], result.target,
                                                   fit))


def _diversity_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                    fit: figures.Fit) -> Rendered:
    rec = analysis.recording
    diversity = group_diversity(analysis.summary_rows, rec.stacked('query_to_kv')[:, 0],
                                max(layer.key_norms.shape[1] for layer in rec.layers))
    if np.isnan(diversity).all():
        return Rendered('no within-group diversity: every KV head serves one query head')
    return Rendered(f'mean Jensen-Shannon divergence (bits) between the {analysis.summary_label} attention of the '
                    'query heads sharing each KV head; blank: fewer than two share it',
                    figure=figures.diversity_figure(diversity, fit))


def _faithfulness_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                       fit: figures.Fit) -> Rendered:
    if not analysis.faithfulness:
        return Rendered(analysis.deep_note)
    aucs = '; '.join(f'{name}: deletion AUC {c["deletion_auc"]:.3f}, insertion AUC {c["insertion_auc"]:.3f}'
                     for name, c in analysis.faithfulness.items())
    return Rendered(f'the {analysis.ablation.target} score as the most attended patches are deleted (solid, −) or '
                    f'inserted (dashed, +); {aucs}',
                    figure=figures.faithfulness_figure(analysis.faithfulness, analysis.ablation.target, fit))


def _conversion_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                     fit: figures.Fit) -> Rendered:
    if analysis.calibration is None:
        return Rendered('no calibration report: this view shows a model calibrated here '
                        '(`convert:SOURCE:VARIANT:G:calibrated`), mean-pooled against calibrated')
    return Rendered(conversion_error_caption(analysis.calibration),
                    figure=conversion_error_figure(analysis.calibration, fit))


def _pick_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis], fit: figures.Fit) -> Rendered:
    rec = analysis.recording
    layer = layer_index(analysis, choice.layer)
    pooling = analysis.pooling if analysis.grouping['variant'] == 'mha' else None
    try:
        maps = picked_maps(rec, layer, parse_query(choice.query, rec),
                           None if pooling is None else pooling.groups(layer, analysis.num_heads))
    except ValueError as e:
        return Rendered(public_message(e))
    if choice.side == 'columns' and maps.columns is None:
        return Rendered('no token looks at the attention-pool query: it reads the tokens after the last block')
    caption = pick_caption(maps, choice.side) + ('' if pooling is None or maps.key_norms is None else
                                    f'; MHA heads grouped as {pooling.by} shares a key head at G = '
                                    f'{pooling.num_kv_heads}, each group\'s mean-pooled key norms beside them')
    hover = hover_maps(rec, layer)
    first = next((p for p in maps.picks if p.row is not None), None)
    panel = None if hover is None else hover_html(hover, analysis.view, choice.width,
                                                   (first.row, first.col) if first else (-1, -1))
    heads, patches = rec.layers[layer].query_to_kv.shape[1], rec.grid_size[0] * rec.grid_size[1]
    note = '' if hover is not None else (f'; click to pick (hover is drawn in the browser up to '
                                         f'{HOVER_MAX_BYTES / 2 ** 20:.0f} MiB of maps a layer, this model\'s are '
                                         f'{heads * patches ** 2 / 2 ** 20:.1f} MiB)')
    return Rendered(caption + note, figure=pick_figure(maps, rec.grid_size, fit, choice.side), html=panel)


def _geometry_view(analysis: Analysis, choice: Choice, reference: Optional[Analysis],
                   fit: figures.Fit) -> Rendered:
    rec = analysis.recording
    head = head_label(analysis, choice.head)
    try:
        geo = group_geometry(rec, layer_index(analysis, choice.layer), 0 if head == 'mean' else int(head),
                             parse_query(choice.query, rec))
    except ValueError as e:
        return Rendered(public_message(e))
    return Rendered(geometry_caption(geo), figure=geometry_figure(geo, fit))


_RENDERERS = dict(overlay=_overlay_view, rollout=_rollout_view, pool=_pool_view, grid=_grid_view, key_norms=_key_norms_view,
                  assignment=_assignment_view, history=_history_view, difference=_difference_view,
                  ablation=_ablation_view, diversity=_diversity_view, faithfulness=_faithfulness_view,
                  conversion=_conversion_view, pick=_pick_view, geometry=_geometry_view)
assert set(_RENDERERS) == set(VIEWS)


def _summary_text(analysis: Analysis) -> str:
    rec = analysis.recording
    others = [label for i, label in enumerate(rec.row_labels) if i != rec.summary_row]
    notes = [f'attention of the **{analysis.summary_label}**' + (f' (also recorded: {", ".join(others)})'
                                                                 if others else '')]
    return (analysis.summary or analysis.spec) + '\n\n' + ' · '.join(notes + analysis.notes)
