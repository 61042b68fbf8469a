"""What the app does, without the app: run several models on one image and turn the results into views.

Kept apart from ``app.py`` (layout and wiring only) so it can be called and tested directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import figures
from .analysis import Analysis, analyse
from .heads import group_diversity
from .images import load_image
from .models import ModelRegistry
from .specs import public_message, shown

__all__ = ['MAX_MODELS', 'NO_MODEL', 'ColumnView', 'run_models', 'column_view', 'reference_for', 'head_label',
           'PANELS', 'FIGURES', 'IMAGES']

MAX_MODELS = 4
NO_MODEL = '(none)'  # the choice that leaves a column empty


def _is_empty(spec: Optional[str]) -> bool:
    return not spec or not spec.strip() or spec.strip() == NO_MODEL


@dataclass
class ColumnView:
    """Everything one result column shows."""
    summary: str
    top5: Dict[str, float]
    overlay: Optional[np.ndarray]
    rollout: Optional[np.ndarray]
    grid: Any
    key_norms: Any
    assignment: Any
    history: Any
    difference: Any
    ablation: Any = None
    diversity: Any = None
    faithfulness: Any = None
    view: Optional[np.ndarray] = None  # the image as the model saw it (resized, cropped)


PANELS = ('summary', 'top5', 'overlay', 'rollout', 'grid', 'key_norms', 'assignment', 'history', 'difference',
          'ablation', 'diversity', 'faithfulness', 'view')
IMAGES = ('overlay', 'rollout', 'view')  # the panels that are pictures (written as PNG files by the app)
FIGURES = ('grid', 'key_norms', 'assignment', 'history', 'difference', 'ablation', 'diversity', 'faithfulness')


def run_models(registry: ModelRegistry, image_path: Optional[str], specs: Sequence[Optional[str]],
               progress: Any = None, deep: bool = False) -> tuple:
    """Load the image once (safely) and run each chosen model on it.

    Returns ``(analyses, errors, notes)``: ``analyses[i]`` is None where slot ``i`` is empty or failed, and
    ``errors[i]`` then says why. A bad image raises :class:`ImageInputError` before any model runs.
    """
    loaded_image = load_image(image_path)
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
        try:
            if progress is not None:
                progress((i + 0.5) / len(specs), desc=f'{shown(spec, 40)}: loading and running')
            loaded = registry.get(spec)
            analyses.append(analyse(loaded, loaded_image.image, deep=deep))
            errors.append(None)
        except (ValueError, OSError, RuntimeError, TypeError, IndexError, KeyError, AttributeError) as e:
            # ModelLoadError / SpecError / ConfigError are ValueErrors; anything else from a model is named,
            # never shown as a traceback or with a server path.
            analyses.append(None)
            errors.append(public_message(f'{shown(spec)}: {e}' if not isinstance(e, ValueError)
                                         else f'{shown(spec, 40)}: {e}'))
    return analyses, errors, loaded_image.notes


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


def column_view(analysis: Analysis, layer: int, head: str, fusion: str, reference: Optional[Analysis],
                ablation_mode: str = 'zero') -> ColumnView:
    """Every view of one column from the compact analysis: no model runs, nothing T x T is touched."""
    rec = analysis.recording
    L = len(rec.layers)
    layer = min(max(int(layer), 0), L - 1)
    grid = rec.grid_size
    overlay = figures.overlay(analysis.view, figures.patch_grid(
        _head_rows(analysis, layer, head_label(analysis, head)), grid))
    rollout = figures.overlay(analysis.view, figures.patch_grid(analysis.rollout(fusion), grid))
    all_rows = analysis.summary_rows  # (L, H, patches)
    g = analysis.grouping
    title = f"{g['variant'].upper()} G={g['num_kv_heads']}"
    who = analysis.summary_label
    return ColumnView(
        summary=_summary_text(analysis),
        top5={label: p for label, p in analysis.top5},
        overlay=overlay,
        rollout=rollout,
        grid=figures.heads_layers_figure(all_rows, grid, title=f'{title}: {who}, heads × layers'),
        key_norms=figures.key_norm_figure(rec.stacked('key_norms')[:, 0], rec.stacked('allocation')[:, 0],
                                          title=f'{title}: key norms → allocation'),
        assignment=figures.assignment_figure(rec.stacked('query_to_kv')[:, 0], rec.stacked('allocation')[:, 0],
                                             title=f'{title}: query → KV head', source_heads=analysis.source_heads),
        history=_history_view(analysis, layer, title),
        difference=_difference_view(analysis, reference, title),
        ablation=_ablation_view(analysis, title, ablation_mode),
        diversity=figures.diversity_figure(
            group_diversity(all_rows, rec.stacked('query_to_kv')[:, 0], int(g['num_kv_heads'])),
            title=f'{title}: within-group diversity ({who})'),
        faithfulness=(figures.faithfulness_figure(analysis.faithfulness, analysis.ablation.target,
                                                  title=f'{title}: deletion / insertion')
                      if analysis.faithfulness else figures.message_figure(analysis.deep_note)),
        view=analysis.view,
    )


def _summary_text(analysis: Analysis) -> str:
    rec = analysis.recording
    others = [label for i, label in enumerate(rec.row_labels) if i != rec.summary_row]
    notes = [f'attention of the **{analysis.summary_label}**' + (f' (also recorded: {", ".join(others)})'
                                                                 if others else '')]
    return (analysis.summary or analysis.spec) + '\n\n' + ' · '.join(notes + analysis.notes)


def _history_view(analysis: Analysis, layer: int, title: str) -> Any:
    if analysis.history is None:
        return figures.message_figure('no allocation history (DGQA only)')
    hist = analysis.history[layer]
    return figures.allocation_history_figure(hist['steps'], np.array(hist['allocation']), layer,
                                             title=f'{title}: allocation over training, layer {layer}')


def _difference_view(analysis: Analysis, reference: Optional[Analysis], title: str) -> Any:
    if reference is None:
        return figures.message_figure('add an MHA model to compare')
    if reference is analysis:
        return figures.message_figure('this is the MHA reference')
    try:
        return figures.difference_figure(analysis.summary_rows.mean(1), reference.summary_rows.mean(1),
                                         analysis.recording.grid_size,
                                         title=f'{title} − {reference.spec}: {analysis.summary_label} attention')
    except ValueError as e:
        return figures.message_figure(str(e))


def _ablation_view(analysis: Analysis, title: str, mode: str) -> Any:
    result = analysis.ablation
    if result is None:
        return figures.message_figure(analysis.deep_note)
    if mode not in result.kv:
        raise ValueError(f'ablation mode must be one of {tuple(result.kv)}, got {mode!r}')
    return figures.ablation_figure(result.kv[mode], result.query[mode], result.target,
                                   title=f'{title}: drop of {result.target} ({mode} ablation)')
