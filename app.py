"""GQA Lens: compare grouped-query attention variants of a ViT on one image, side by side.

    python app.py                      # http://127.0.0.1:7860 with the embedded models, no network needed
    python app.py --model-dir DIR      # also serve DIR's model folders as local:NAME

Layout and wiring only; the work happens in ``gqa_core.lens`` (running models: ``views``, ``analysis``;
figures: ``figures``; the zip: ``export``). Importing this module does nothing else: :func:`create_app` builds
an app for some :class:`~gqa_core.core.settings.Settings` (every ``GQA_LENS_*`` variable, read there),
:meth:`LensApp.start` starts its session reaper and fits torch's threads to the machine, and :func:`main` does
both and launches it. ``demo``, the Blocks a Space (or gradio's reload mode) serves, is made on first use.
"""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gradio as gr
import numpy as np

from gqa_core import VARIANTS
from gqa_core.core.ablation import ABLATION_MODES
from gqa_core.core.convert import INITS
from gqa_core.core.device import DEVICE_CHOICES
from gqa_core.core.head_order import HEAD_ORDERS
from gqa_core.core.settings import Settings
from gqa_core.io.safe_config import Budget
from gqa_core.lens import figures
from gqa_core.lens.analysis import FUSIONS
from gqa_core.lens.explorer import (LIVE_MAX_IMAGES, kv_budget_table, live_kv_budget, seeds_table,
                                    shipped_dataset_stats, shipped_kv_budget, shipped_seeds)
from gqa_core.lens.export import export_zip
from gqa_core.lens.hosting import cpu_cores, fit_torch_threads
from gqa_core.lens.hover import HOVER_PANEL_SCRIPT, HOVER_SCRIPT
from gqa_core.lens.images import ImageInputError
from gqa_core.lens.models import DEFAULT_MODELS, HUB_SOURCES, ModelLoadError, ModelRegistry, hub_note
from gqa_core.lens.pick import MAX_QUERY_CHARS, SIDES, cell_place, parse_query, pick_names, pick_place, picked_maps
from gqa_core.lens.sessions import SessionReaper
from gqa_core.lens.specs import SpecError, conversion_spec, public_message
from gqa_core.lens.tempfiles import ExpiringFiles
from gqa_core.lens.tools import LensTools, page_only
from gqa_core.lens.views import (MAX_MODELS, NO_MODEL, VIEW_LABELS, VIEWS, Choice, column_width, header,
                                 reference_for, render, run_models)

ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted(str(p) for p in (ROOT / 'assets' / 'examples').glob('*.jpg'))


ABOUT_MODELS = """The **embedded models** are a small ViT trained here on **CIFAR-10**: they know ten classes
(airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck) and see **32 × 32 px**, so any photo is
shrunk to that and a person or a street will be called one of those ten. Each column says what its model
was trained on and shows what it saw."""

HELP = """Pick up to four models. Besides the embedded ones you can type
`hub:ORG/NAME[@REVISION]` (a saved GQA Lens model on the Hugging Face Hub, or a transformers ViT, DeiT, DINOv2 or
DINOv3 repo such as `hub:facebook/dinov2-small`, loaded as MHA), `local:NAME` (folders the operator allowed) or
`convert:SOURCE:VARIANT:G`, e.g.
`convert:embedded/mha:kdgqa:2` or `convert:hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k:gqa:3`
(training-free: K/V heads mean-pooled); add `:calibrated` to fit the shared K/V heads to the MHA on the shipped
images (about a minute, no labels: `convert:embedded/mha:gqa:4:calibrated`; the view *where GQA hurts* then shows
what it repaired); add `:output-error` to let the head-order advisor choose which MHA heads
share a KV head (`convert:embedded/mha:gqa:4:output-error`)."""


def _raw_path(payload: Any) -> Optional[str]:
    """Hand the uploaded file to our own guarded loader instead of letting gradio decode it unguarded."""
    return None if payload is None else payload.path


COLUMN = ('summary', 'top5', 'seen', 'picture', 'figure', 'hover', 'caption')  # a result column's outputs, in order
VIEW_PART = ('picture', 'figure', 'hover', 'caption')  # what a new view changes
CONTROLS = ('layer', 'head', 'fusion', 'mode', 'query', 'side')  # the view controls, in the handlers' order


def _hidden_column(message: str = '') -> Dict[str, Any]:
    """A column with no model: hidden, unless it holds the message saying why its model did not run."""
    hidden = gr.update(visible=False, value=None)
    return dict(column=gr.Column(visible=bool(message)), summary=message, top5=hidden, seen=hidden, picture=hidden,
                figure=hidden, hover=gr.update(visible=False, value=''), caption='')


def _column_outputs(column: Dict[str, Any], names: Sequence[str] = ('column', *COLUMN)) -> List[Any]:
    return [column[name] for name in names]


def _view_name(label: str) -> str:
    if label in VIEWS:
        return label
    if label not in VIEW_LABELS:
        raise gr.Error(f'unknown view {str(label)[:40]!r}; choose one of {", ".join(VIEW_LABELS)}')
    return VIEW_LABELS[label]


def _controls_shown(label: str) -> List[Any]:
    """Only the controls the chosen view reads are shown (the pick tools with the query)."""
    used = VIEWS[_view_name(label)].controls
    return [gr.update(visible=name in used) for name in CONTROLS] + [gr.update(visible='query' in used)]


def _query_text(query: Any) -> str:
    """The query control's text, cut to a bound (a hostile client may send anything; the parser refuses what is
    longer than a query can be)."""
    return str(query or '')[:MAX_QUERY_CHARS + 1]


DEFAULT_SIDE = next(iter(SIDES))


def _side(label: Any) -> str:
    """The picked view's side for the radio's label (a hostile client may send anything: the default)."""
    return SIDES.get(str(label), 'rows')


STEPS = {'left': (0, -1), 'up': (-1, 0), 'down': (1, 0), 'right': (0, 1)}  # the pick tools' moves: (rows, cols)


def _head_choices(num_heads: int) -> List[str]:
    return ['mean'] + [str(h) for h in range(num_heads)]


def _fitted_controls(depth: int, heads: int, layer: float, head: str) -> List[Any]:
    """Layer slider and head list for models of ``depth`` layers and ``heads`` heads at most."""
    layer = min(int(layer), depth - 1)
    head = head if head in _head_choices(heads) else 'mean'
    # a slider needs minimum < maximum: a one-layer model keeps the range 0..1
    return [gr.update(maximum=max(depth - 1, 1), value=layer), gr.update(choices=_head_choices(heads), value=head)]


def build_spec(source: str, variant: str, g: float, head_order: str = 'consecutive', init: str = 'mean') -> str:
    """The conversion builder's spec, or a one-line error when its source is not a model spec."""
    try:
        return conversion_spec(source, variant, int(g), head_order, init)
    except SpecError as e:
        raise gr.Error(public_message(e)) from None


class LensApp:
    """One served app: its model registry, its per-request files, its session reaper and its event handlers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models, model_dirs=settings.model_dirs,
                                      budget=Budget(settings.max_params, settings.max_tokens),
                                      token_repos=settings.token_repos, device=settings.device)
        self.files = ExpiringFiles(ttl=max(settings.session_ttl, 60))  # a fresh path per file, swept when old
        self.tools = LensTools(self.registry)  # what an MCP client calls (settings.mcp)
        self.reaper: Optional[SessionReaper] = None
        self.demo: Optional[gr.Blocks] = None

    def start(self) -> 'LensApp':
        """What serving needs besides the Blocks: torch's threads fitted to the cores (``concurrency`` requests
        of one thread per core keep about 2 x cores busy) and the reaper of idle sessions."""
        fit_torch_threads(cpu_cores())
        if self.reaper is None:
            ttl = self.settings.session_ttl
            self.reaper = SessionReaper(self.demo, ttl=ttl, interval=min(10.0, max(ttl / 4, 0.5))).start()
        return self

    def launch(self, **kwargs: Any) -> None:
        """Serve the Blocks (``kwargs``: :meth:`gradio.Blocks.launch`'s), with the MCP server at
        ``/gradio_api/mcp/`` unless ``settings.mcp`` is off (``GQA_LENS_MCP=0``)."""
        with warnings.catch_warnings():  # the page's endpoints read session state, but none of them is a tool
            warnings.filterwarnings('ignore', message='This MCP server includes a tool that has a gr.State input')
            self.demo.launch(mcp_server=self.settings.mcp, **kwargs)

    def _columns(self, analyses: List[Any], errors: List[Optional[str]], choice: Choice,
                 view_only: bool = False) -> List[Any]:
        """Every column's outputs (``column`` then ``COLUMN``), or with ``view_only`` only its ``VIEW_PART``: a
        new view leaves the summary, the top-5 and the picture seen as they are (and does not rebuild them)."""
        reference = reference_for(analyses)
        choice = replace(choice, width=column_width(sum(a is not None or bool(e) for a, e in zip(analyses, errors))))
        names = VIEW_PART if view_only else ('column', *COLUMN)
        out: List[Any] = []
        for analysis, error in zip(analyses, errors):
            if analysis is None:
                column = _hidden_column(f'⚠️ {error}' if error else '')
            else:
                shown = render(analysis, choice, reference)
                picture = None if shown.picture is None else self.files.write_png(shown.picture)
                column = dict(picture=gr.update(visible=picture is not None, value=picture),
                              figure=gr.update(visible=shown.figure is not None, value=shown.figure),
                              hover=gr.update(visible=shown.html is not None, value=shown.html or ''),
                              caption=shown.caption if shown.applies else f'*{shown.caption}*')
                if not view_only:
                    top = header(analysis)
                    column.update(column=gr.Column(visible=True), summary=top.summary,
                                  top5=gr.update(visible=bool(top.top5), value=top.top5 or None),
                                  seen=gr.update(visible=True, value=self.files.write_png(top.view)))
            out += [column[name] for name in names]
        return out

    def run(self, image: Optional[str], m0: str, m1: str, m2: str, m3: str, view: str, layer: float, head: str,
            fusion: str, mode: str = 'zero', deep: bool = False, query: str = '', side: str = DEFAULT_SIDE,
            progress: gr.Progress = gr.Progress()) -> List[Any]:
        choice = Choice(_view_name(view), int(layer), head, fusion, mode, query=_query_text(query), side=_side(side))
        try:
            analyses, errors, notes = run_models(self.registry, image, [m0, m1, m2, m3], progress, deep=bool(deep))
        except (ImageInputError, ValueError) as e:
            hidden = _column_outputs(_hidden_column())
            return [None, f'⚠️ {public_message(e)}', gr.update(), gr.update()] + hidden * MAX_MODELS
        status = '; '.join(notes) if notes else 'done'
        if any(errors):
            status = '⚠️ ' + ' · '.join(e for e in errors if e) + (f' ({status})' if notes else '')
        ran = [a for a in analyses if a is not None]
        if not ran:  # every chosen model failed: nothing to fit the controls to
            return [analyses, status, gr.update(), gr.update()] + self._columns(analyses, errors, choice)
        controls = _fitted_controls(max(len(a.recording.layers) for a in ran), max(a.num_heads for a in ran),
                                    layer, head)
        choice = replace(choice, layer=controls[0]['value'], head=controls[1]['value'])
        return [analyses, status, *controls] + self._columns(analyses, errors, choice)

    def rerender(self, state: Optional[List[Any]], view: str, layer: float, head: str, fusion: str,
                 mode: str, query: str = '', side: str = DEFAULT_SIDE) -> List[Any]:
        """A new view or control of the results kept in the session: no model runs again."""
        if not state:
            return _column_outputs(_hidden_column(), VIEW_PART) * MAX_MODELS
        return self._columns(state, [None] * len(state),
                             Choice(_view_name(view), int(layer), head, fusion, mode, query=_query_text(query),
                                    side=_side(side)), view_only=True)

    @staticmethod
    def prefix_choices(state: Optional[List[Any]]) -> Any:
        """The named tokens a pick may give in any model of the run (class token, registers, the pool's query)."""
        names = dict.fromkeys(n for a in state or [] if a is not None for n in pick_names(a.recording))
        return gr.update(choices=list(names), value=None)

    @staticmethod
    def named(name: Optional[str], query: str, add: bool) -> Any:
        """The query after choosing a named token (added to it when ``add``)."""
        old = _query_text(query).strip()
        if not name:
            return gr.update()
        return f'{old}; {name}' if add and old else str(name)[:MAX_QUERY_CHARS]

    def clicked(self, index: int) -> Callable[..., List[Any]]:
        """The handler of a click on column ``index``'s picture: the clicked place as fractions of that picture
        (added to the query when ``add``), and the picked-query view."""
        def handler(state: Optional[List[Any]], query: str, add: bool, evt: gr.SelectData) -> List[Any]:
            analysis = state[index] if state and index < len(state) else None
            if analysis is None or not isinstance(evt.index, (list, tuple)) or len(evt.index) != 2:
                return [gr.update(), gr.update()]
            height, width = figures.pixelated(analysis.view).shape[:2]  # the picture shown, in its own pixels
            x, y = ((float(p) + 0.5) / size for p, size in zip(evt.index, (width, height)))
            place = f'{min(max(x, 0.0), 1.0):.4f}, {min(max(y, 0.0), 1.0):.4f}'
            old = _query_text(query).strip()
            return [f'{old}; {place}' if add and old else place, VIEWS['pick'].label]
        return handler

    def step(self, direction: str) -> Callable[..., Any]:
        """The handler of a move (a pick tool or an arrow key): the last picked place moved by one patch of the
        first model's grid, kept inside it; a prefix token (or an unreadable query) starts from the centre patch."""
        d_row, d_col = STEPS[direction]

        def handler(state: Optional[List[Any]], query: str) -> Any:
            analysis = next((a for a in state or [] if a is not None), None)
            if analysis is None:
                return gr.update()
            rec = analysis.recording
            rows, cols = int(rec.grid_size[0]), int(rec.grid_size[1])
            kept = [p.strip() for p in _query_text(query).split(';') if p.strip()]
            try:
                last = pick_place(rec, parse_query(kept[-1], rec)[0]) if kept else None
            except ValueError:
                last = None
            row, col = (rows // 2, cols // 2) if last is None or last.row is None else (
                min(max(last.row + d_row, 0), rows - 1), min(max(last.col + d_col, 0), cols - 1))
            return '; '.join(kept[:-1] + [cell_place((rows, cols), row, col)])
        return handler

    def pick(self, state: Optional[List[Any]], query: str, layer: float) -> Dict[str, Any]:
        """API: the picked token of every model of this session's last run, and its maps at ``layer``."""
        if not state or not any(a is not None for a in state):
            raise gr.Error('no results in this session: call /run first (the same client), then /pick')
        try:
            number = float(layer)
        except (TypeError, ValueError):
            raise gr.Error('layer must be an integer') from None
        if not (np.isfinite(number) and number == int(number) and number >= 0):
            raise gr.Error(f'layer must be an integer from 0, got {str(layer)[:20]}')
        models = []
        for analysis in state:
            if analysis is None:
                continue
            rec = analysis.recording
            if int(number) >= len(rec.layers):
                raise gr.Error(f'layer {int(number)} does not exist: {analysis.spec} has {len(rec.layers)} layers')
            try:
                maps = picked_maps(rec, int(number), parse_query(_query_text(query), rec))
            except ValueError as e:
                raise gr.Error(f'{analysis.spec}: {public_message(e)}') from None
            models.append(dict(spec=analysis.spec, grid=list(rec.grid_size), **maps.as_dict()))
        return dict(models=models)

    def controls_for(self, layer: float, head: str, *specs: str) -> List[Any]:
        """Layer and head choices that follow the chosen models before a run, from the geometry the registry
        knows without downloading anything (embedded and local models, models already loaded)."""
        shapes = [self.registry.known_geometry(s) for s in specs]
        shapes = [s for s in shapes if s is not None]
        if not shapes:
            return [gr.update(), gr.update()]
        return _fitted_controls(max(d for d, _ in shapes), max(h for _, h in shapes), layer, head)

    def export(self, state: Optional[List[Any]], layer: float, head: str, fusion: str, query: str = '') -> Any:
        if not state or not any(state):
            raise gr.Error('run the models on an image first')
        folder = self.files.new_path('')
        folder.mkdir()
        try:
            path = export_zip(state, int(layer), head, fusion, folder / 'gqa-lens-analysis.zip', self.registry,
                              _query_text(query))
            return gr.update(visible=True, value=str(path))
        except (ValueError, OSError, RuntimeError) as e:
            raise gr.Error(f'export failed: {public_message(e)}') from None

    def predict(self, image: Optional[str], model: str) -> dict:
        """API: top-5 {label: probability} of one model on one image (the MCP tool's, refusals included)."""
        return {label: p for label, p in self.tools.top5(image, model).top5}

    def kv_budget_live(self, spec: str, n: float, progress: gr.Progress = gr.Progress()) -> List[Any]:
        """API: the KV-budget explorer for any multi-head model, on the shipped images."""
        try:
            result = live_kv_budget(self.registry, spec, int(n), lambda f, what: progress(f, desc=what))
        except (ModelLoadError, ValueError, OSError, RuntimeError) as e:
            raise gr.Error(public_message(e)) from None
        return [gr.update(visible=True, value=figures.kv_budget_figure(result)), kv_budget_table(result)]

    def unload(self, request: gr.Request) -> None:
        if self.reaper is not None:
            self.reaper.on_unload(request)


def _shipped(load: Callable[[], Dict[str, Any]], missing: str) -> Optional[Dict[str, Any]]:
    """A shipped analysis file, or None after one line saying it is missing: the tab still builds without it."""
    try:
        return load()
    except (OSError, ValueError):
        gr.Markdown(missing)
        return None


def _dataset_tab() -> None:
    stats = _shipped(shipped_dataset_stats, 'no shipped dataset view (assets/analysis/dataset/stats.json)')
    if stats is None:
        return
    gr.Markdown(f"The embedded family on the full CIFAR-10 {stats['split']} split ({stats['n']:,} images), "
                'from `python -m gqa_core.stats` (shipped JSON).')
    gr.Dataframe([[name, round(100 * s['top1'], 2), s['grouping']['variant'],
                   round(float(np.mean(s['idle_rate'])), 4), round(float(np.mean(s['allocation_entropy'])), 4)]
                  for name, s in stats['models'].items()],
                 headers=['model', 'top-1 %', 'variant', 'mean idle rate', 'mean entropy (bits)'],
                 elem_id='dataset-table', interactive=False)
    for i, fig in enumerate(figures.stats_figures(stats)):
        gr.Plot(fig, elem_id=f'dataset-plot-{i}')
    _seeds_section()


def _seeds_section() -> None:
    seeds = _shipped(shipped_seeds, 'no shipped seed comparison (assets/analysis/seeds/seeds.json)')
    if seeds is None:
        return
    gr.Markdown('**Does a key-driven variant beat GQA beyond seed noise?** Every variant was uptrained from the '
                'MHA model with one budget and three seeds; a run is better or worse than GQA of the same head order '
                "when Welch's two-sided t-test on the seeds' test top-1 gives p < 0.05 "
                '(`python -m gqa_core.training.seeds`, shipped JSON).')
    gr.Plot(figures.seeds_figure(seeds), elem_id='seeds-plot')
    gr.Dataframe(seeds_table(seeds), headers=['run', 'seeds', 'val top-1 %', 'test top-1 %', 'against GQA'],
                 elem_id='seeds-table', interactive=False, wrap=True)


def _kv_budget_tab(lens: LensApp, choices: List[str]) -> None:
    headers = ['G', 'variant', 'head order', 'K/V init', 'K/V bytes', 'top-1 %', 'agreement %']
    try:
        shipped = shipped_kv_budget()
        gr.Markdown(f"Accuracy against K/V cache per image for `{shipped['model']}`: every G, GQA and KDGQA, "
                    f"consecutive vs advised head order, training-free, full CIFAR-10 {shipped['split']} split "
                    f"({shipped['n']:,} images; `python -m gqa_core.kv_budget`, shipped JSON).")
        gr.Plot(figures.kv_budget_figure(shipped), elem_id='kvb-shipped-plot')
        gr.Dataframe(kv_budget_table(shipped), headers=headers, elem_id='kvb-shipped-table', interactive=False)
    except (OSError, ValueError):
        gr.Markdown('no shipped KV-budget result (assets/analysis/kv-budget/kv_budget.json)')
    gr.Markdown(f'**Live** for another multi-head model, or one that shares K/V heads as it was built (timm\'s '
                f'Sapiens2: a square marks it), on up to {LIVE_MAX_IMAGES} of the shipped images (top-1 when the '
                'model has CIFAR-10 labels, agreement with its MHA predictions always):')
    with gr.Row():
        spec = gr.Dropdown(choices, value='embedded/mha', allow_custom_value=True,
                           label='model (MHA, or GQA as built)',
                           elem_id='kvb-spec')
        n = gr.Slider(8, LIVE_MAX_IMAGES, value=64, step=8, label='images', elem_id='kvb-n')
        button = gr.Button('Compute', elem_id='kvb-run')
    plot = gr.Plot(elem_id='kvb-live-plot', visible=False)  # shown once computed: never an empty frame
    table = gr.Dataframe(headers=headers, elem_id='kvb-live-table', interactive=False)
    button.click(page_only(lens.kv_budget_live), [spec, n], [plot, table], api_name='kv_budget')


def _inputs(choices: List[str], defaults: List[str]) -> dict:
    """The image, the four model choices, the convert-on-the-fly builder and Run."""
    c: dict = {}
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            c['image'] = gr.Image(type='filepath', sources=['upload', 'clipboard', 'webcam'], label='image',
                                  elem_id='image', height=240)
            c['image'].preprocess = _raw_path
            if EXAMPLES:
                gr.Examples(EXAMPLES, inputs=[c['image']], label='examples (CIFAR-10 test images, a photo)')
        with gr.Column(scale=2):
            gr.Markdown(ABOUT_MODELS)
            with gr.Row():
                c['models'] = [gr.Dropdown(choices, value=defaults[i], label=f'model {i + 1}', allow_custom_value=True,
                                           elem_id=f'model-{i}', min_width=160) for i in range(MAX_MODELS)]
            with gr.Accordion('other models: the Hub, local folders, convert on the fly', open=False):
                gr.Markdown(HELP)
                with gr.Row():
                    c['convert'] = [
                        gr.Dropdown(['embedded/mha', *HUB_SOURCES], value='embedded/mha', allow_custom_value=True,
                                    label='source (embedded/mha, hf-hub:…, timm name)', elem_id='convert-source',
                                    min_width=260),
                        gr.Dropdown(list(VARIANTS), value='kdgqa', label='variant', min_width=100),
                        gr.Number(value=2, precision=0, label='G (KV heads)', min_width=90),
                        gr.Radio(list(HEAD_ORDERS), value='consecutive', label='head order', min_width=180),
                        gr.Radio(list(INITS), value='mean', label='K/V heads', elem_id='convert-init',
                                 min_width=160)]
                    c['use'] = gr.Button('use as model 4', elem_id='convert-use')
                c['source_note'] = gr.Markdown(elem_id='convert-source-note')
            with gr.Row():
                c['deep'] = gr.Checkbox(False, label='which heads matter: ablation + faithfulness (seconds to minutes a model)',
                                        elem_id='deep')
                c['run'] = gr.Button('Run', variant='primary', elem_id='run')
            c['status'] = gr.Markdown(elem_id='status')
    return c


def _view_controls(geometry: Tuple[int, int]) -> dict:
    """The view selector and the controls of the chosen view (only those it reads are shown), the layer and
    head choices fitted to ``geometry``: (layers, heads) of the largest default model."""
    c: dict = {}
    first = next(iter(VIEWS.values()))
    depth, heads = geometry
    c['view'] = gr.Radio([v.label for v in VIEWS.values()], value=first.label, label='view', elem_id='view')
    with gr.Row():
        c['layer'] = gr.Slider(0, max(depth - 1, 1), value=0, step=1, label='layer', elem_id='layer', visible='layer' in first.controls)
        c['head'] = gr.Dropdown(_head_choices(heads), value='mean', label='head', elem_id='head', visible='head' in first.controls)
        c['fusion'] = gr.Radio(list(FUSIONS), value='mean', label='rollout head fusion', elem_id='fusion',
                               visible='fusion' in first.controls)
        c['mode'] = gr.Radio(list(ABLATION_MODES), value='zero', label='ablation', elem_id='ablation-mode',
                             visible='mode' in first.controls)
        c['query'] = gr.Textbox(value='', label='query: click a patch on what a model saw, or type class token, '
                                'register 0, … or x, y (fractions of the picture; several separated by ;, Enter)',
                                elem_id='query', max_lines=1, visible='query' in first.controls)
        c['side'] = gr.Radio(list(SIDES), value=DEFAULT_SIDE, label='the picked token\'s', elem_id='pick-side',
                             visible='side' in first.controls)
    with gr.Row(visible='query' in first.controls, elem_id='pick-tools') as c['pick_tools']:
        c['prefix'] = gr.Dropdown([], value=None, label='or a named token', elem_id='pick-prefix', min_width=160,
                                  scale=0)
        c['pick_add'] = gr.Checkbox(False, label='clicks add to the pick (their maps averaged)', elem_id='pick-add',
                                    min_width=200)
        for name, arrow in (('left', '◀'), ('up', '▲'), ('down', '▼'), ('right', '▶')):
            c[f'pick_{name}'] = gr.Button(arrow, elem_id=f'pick-{name}', size='sm', scale=0, min_width=44)
        gr.Markdown('<small>move the pick one patch (or the arrow keys)</small>', elem_id='pick-keys-note')
    # the page script: hover drawing, arrow keys, clicks on geometry points (in the DOM, not shown)
    gr.HTML('', js_on_load=HOVER_SCRIPT, visible='hidden', elem_id='pick-script')
    return c


def _result_columns() -> List[Dict[str, Any]]:
    """One column per model (hidden while it has no model), each its components by name (``column``,
    ``COLUMN``): the summary, the top-5 beside the picture the model saw, and the chosen view with its caption."""
    columns: List[Dict[str, Any]] = []
    with gr.Row(equal_height=False):
        for i in range(MAX_MODELS):
            with gr.Column(min_width=240, visible=False) as column:
                summary = gr.Markdown(elem_id=f'summary-{i}', elem_classes=['summary'])
                with gr.Row():
                    top5 = gr.Label(num_top_classes=5, label='top-5', elem_id=f'top5-{i}', scale=2, visible=False,
                                    min_width=120)
                    with gr.Column(scale=1, min_width=80):
                        # labelled underneath: a floating label would cover a picture this small
                        seen = gr.Image(show_label=False, elem_id=f'seen-{i}', interactive=False, height=112,
                                        visible=False, buttons=[], container=False, alt_text='what the model saw')
                        gr.Markdown('<small>what the model saw</small>', elem_classes=['seen-label'])
                picture = gr.Image(label='view', show_label=False, elem_id=f'picture-{i}', interactive=False,
                                   height=300, visible=False)
                figure = gr.Plot(show_label=False, elem_id=f'figure-{i}', visible=False)
                hover = gr.HTML('', elem_id=f'hover-{i}', visible=False, js_on_load=HOVER_PANEL_SCRIPT,
                                elem_classes=['hover-panel'])
                caption = gr.Markdown(elem_id=f'caption-{i}', elem_classes=['caption'])
            columns.append(dict(column=column, summary=summary, top5=top5, seen=seen, picture=picture,
                                figure=figure, hover=hover, caption=caption))
    return columns


def _predict_api(lens: LensApp) -> None:
    """API-only endpoint: /predict (image, model spec) -> top-5."""
    with gr.Row(visible=False):
        api_image = gr.Image(type='filepath')
        api_image.preprocess = _raw_path
        api_model = gr.Textbox(value=DEFAULT_MODELS[0])
        api_out = gr.JSON()
        api_button = gr.Button()
    api_button.click(page_only(lens.predict), [api_image, api_model], api_out, api_name='predict')


def _image_tab(lens: LensApp, choices: List[str], defaults: List[str]) -> None:
    """Up to four models on one image, side by side, one view at a time."""
    # Compact results (no T x T maps); dropped after session_ttl idle seconds or when the page closes.
    state = gr.State(time_to_live=lens.settings.session_ttl)
    c = _inputs(choices, defaults)
    known = [g for g in map(lens.registry.known_geometry, defaults) if g is not None] or [(1, 1)]
    v = _view_controls((max(d for d, _ in known), max(h for _, h in known)))
    columns = _result_columns()
    outputs = [out for column in columns for out in _column_outputs(column)]
    with gr.Row():
        export_button = gr.Button('Download everything (zip: JSON, CSV, PNG, figures)', elem_id='export')
        export_file = gr.File(label='analysis', elem_id='export-file', visible=False)
    controls = [v[name] for name in CONTROLS]
    c['run'].click(page_only(lens.run),
                   [c['image'], *c['models'], v['view'], *controls[:4], c['deep'], v['query'], v['side']],
                   [state, c['status'], v['layer'], v['head'], *outputs], api_name='run').then(
        lens.prefix_choices, state, v['prefix'], api_name=False, show_progress='hidden')
    view_outputs = [out for column in columns for out in _column_outputs(column, VIEW_PART)]
    # the view re-renders on a visitor's choice only (.input): a click that switches it re-renders once, below
    v['view'].input(lens.rerender, [state, v['view'], *controls], view_outputs, api_name=False, show_progress='hidden')
    for control in (*controls[:4], v['side']):
        control.change(lens.rerender, [state, v['view'], *controls], view_outputs, api_name=False,
                       show_progress='hidden')
    v['query'].submit(lens.rerender, [state, v['view'], *controls], view_outputs, api_name=False,
                      show_progress='hidden')
    for i, column in enumerate(columns):  # a click on what a model saw picks that place in every model
        column['seen'].select(lens.clicked(i), [state, v['query'], v['pick_add']], [v['query'], v['view']],
                              api_name=False, show_progress='hidden').then(
            lens.rerender, [state, v['view'], *controls], view_outputs, api_name=False, show_progress='hidden')
    v['prefix'].input(lens.named, [v['prefix'], v['query'], v['pick_add']], v['query'], api_name=False,
                      show_progress='hidden').then(lens.rerender, [state, v['view'], *controls], view_outputs,
                                                   api_name=False, show_progress='hidden')
    for name in STEPS:
        v[f'pick_{name}'].click(lens.step(name), [state, v['query']], v['query'], api_name=False,
                                show_progress='hidden').then(
            lens.rerender, [state, v['view'], *controls], view_outputs, api_name=False, show_progress='hidden')
    v['view'].change(_controls_shown, v['view'], [*controls, v['pick_tools']], api_name=False,
                     show_progress='hidden')
    for model in c['models']:
        model.change(lens.controls_for, [v['layer'], v['head'], *c['models']], [v['layer'], v['head']],
                     api_name=False, show_progress='hidden')
    export_button.click(page_only(lens.export), [state, *controls[:3], v['query']], export_file, api_name='export')
    c['use'].click(build_spec, c['convert'], c['models'][-1], api_name=False)
    c['convert'][0].change(hub_note, c['convert'][0], c['source_note'], api_name=False, show_progress='hidden')
    _predict_api(lens)
    _pick_api(lens, state)


def _pick_api(lens: LensApp, state: gr.State) -> None:
    """API-only endpoint: /pick (query, layer) -> each model's picked token and its maps, from the last /run of
    this session (no model runs)."""
    with gr.Row(visible=False):
        query = gr.Textbox()
        layer = gr.Number(value=0, precision=0)
        out = gr.JSON()
        button = gr.Button()
    button.click(page_only(lens.pick), [state, query, layer], out, api_name='pick')


def _mcp_tools(lens: LensApp) -> None:
    """API-only endpoints that are the MCP tools (``gqa_core.lens.tools``): JSON text out, registered before the
    page's endpoints so that each tool keeps its function's name."""
    tools = lens.tools
    with gr.Row(visible=False):
        image = gr.Image(type='filepath', label='image')
        image.preprocess = _raw_path
        model = gr.Textbox(value=DEFAULT_MODELS[0], label='model')
        models = gr.Textbox(value=', '.join(DEFAULT_MODELS), label='models')
        ablation = gr.Checkbox(False, label='ablation')
        num_kv_heads = gr.Number(value=2, precision=0, label='G')
        images = gr.Number(value=64, precision=0, label='images')
        out = gr.Textbox(label='JSON')
        button = gr.Button()
    button.click(tools.predict, [image, model], out, api_name='mcp_predict')
    button.click(tools.analyse, [image, models, ablation], out, api_name='mcp_analyse')
    button.click(tools.advise_grouping, [model, num_kv_heads], out, api_name='mcp_advise_grouping')
    button.click(tools.kv_budget, [model, images], out, api_name='mcp_kv_budget')


def create_app(settings: Optional[Settings] = None) -> LensApp:
    """A GQA Lens app for ``settings`` (default: the environment's) with its Blocks (``lens.demo``) and queue;
    nothing is loaded, started or written until it serves (:meth:`LensApp.start`)."""
    lens = LensApp(settings or Settings.from_env())
    embedded = lens.registry.embedded()
    choices = embedded + lens.registry.local() + [NO_MODEL]
    defaults = [m if m in embedded else NO_MODEL for m in DEFAULT_MODELS]
    ttl = lens.settings.session_ttl
    with gr.Blocks(title='GQA Lens', delete_cache=(300, int(max(ttl, 60)))) as demo:
        if lens.settings.mcp:
            _mcp_tools(lens)
        gr.Markdown('# GQA Lens\nHow grouped-query attention variants of one ViT see an image: predictions, '
                    'attention, key-norm ratios and which query heads each shared KV head serves '
                    '([arXiv 2408.08454](https://arxiv.org/abs/2408.08454)).')
        with gr.Tab('One image', elem_id='tab-image'):
            _image_tab(lens, choices, defaults)
        with gr.Tab('KV budget', elem_id='tab-kv-budget'):
            _kv_budget_tab(lens, embedded + lens.registry.local())
        with gr.Tab('Dataset view', elem_id='tab-dataset'):
            _dataset_tab()
        demo.unload(lens.unload)
    demo.queue(default_concurrency_limit=lens.settings.concurrency, max_size=lens.settings.queue_limit)
    lens.demo = demo
    return lens


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='GQA Lens app')
    parser.add_argument('--model-dir', action='append', default=[],
                        help='a folder whose model sub-folders are served as local:NAME (repeatable)')
    parser.add_argument('--device', help=f'{DEVICE_CHOICES} (default: GQA_LENS_DEVICE, else auto)')
    parser.add_argument('--port', type=int, help='default: GRADIO_SERVER_PORT, else 7860')
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    return replace(settings, model_dirs=(*settings.model_dirs, *args.model_dir), device=args.device or settings.device)


def cli_settings(argv: Optional[Sequence[str]] = None) -> Settings:
    """The environment's settings with the command line's on top."""
    return _settings(_parser().parse_args(argv))


_served: Optional[LensApp] = None


def served() -> LensApp:
    """The one app this process serves, created and started on first use."""
    global _served
    if _served is None:
        _served = create_app().start()
    return _served


def __getattr__(name: str) -> Any:
    """``app.demo`` / ``app.lens``: what Hugging Face Spaces and gradio's reload mode look up, made on first use."""
    if name == 'demo':
        return served().demo
    if name == 'lens':
        return served()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def main(argv: Optional[Sequence[str]] = None) -> None:
    global _served
    args = _parser().parse_args(argv)
    _served = create_app(_settings(args)).start()
    _served.launch(server_name=os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1'), server_port=args.port)


if __name__ == '__main__':
    main()
