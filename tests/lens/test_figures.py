"""Figure builders and analysis helpers on real recordings of the embedded models."""
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from gqa_core.lens import figures
from gqa_core.lens.analysis import FUSIONS, layer_maps, model_input
from support.reference import attention_rollout, prefix_attention
from gqa_core.lens.export import export_zip
from gqa_core.lens.views import Choice, header, reference_for, render
from gqa_core.core.record import record


def test_assignment_heatmap_cells_equal_recorded_query_to_kv(analyses):
    for spec, a in analyses.items():
        q2kv = a.recording.stacked('query_to_kv')[:, 0]
        alloc = a.recording.stacked('allocation')[:, 0]
        fig = figures.assignment_figure(q2kv, alloc)
        heat = fig.data[0]
        assert np.array_equal(np.array(heat.z), q2kv), spec
        assert [row[0] for row in heat.text] == [f'kv{g}' for g in q2kv[:, 0]]
        idle = [f'L{layer} kv{g}' for layer in range(alloc.shape[0]) for g in range(alloc.shape[1])
                if not (q2kv[layer] == g).any()]  # from the query map itself, not from the allocation
        assert figures.idle_heads(alloc) == idle, spec
        caption = render(a, Choice('assignment')).caption
        assert all(name in caption for name in idle) and ('idle' in caption) == bool(idle), (spec, caption)


def test_key_driven_models_show_zero_query_groups(analyses):
    kd = analyses['embedded/kdgqa']
    alloc = kd.recording.stacked('allocation')[:, 0]
    assert (alloc == 0).any(), 'min-max scaling leaves the weakest KV head idle'
    assert 'idle (serving no query): L' in render(kd, Choice('assignment')).caption


def test_key_norm_figure_shows_kdgqa_shares_beside_the_allocation_used(analyses):
    from gqa_core.core.apportion import largest_remainder, min_max_shares
    a = analyses['embedded/kdgqa']
    norms, alloc = a.recording.stacked('key_norms')[:, 0], a.recording.stacked('allocation')[:, 0]
    left, right = figures.key_norm_figure(norms, alloc).data
    shares = min_max_shares(torch.as_tensor(norms)).numpy()
    assert np.allclose(np.array(left.z, dtype=float), shares) and np.allclose(np.array(left.customdata), norms)
    assert np.array_equal(np.array(left.text), largest_remainder(torch.as_tensor(shares), 8).numpy())
    assert np.array_equal(np.array(right.z), alloc)
    assert np.array_equal(np.array(left.text), np.array(right.z)), 'KDGQA itself allocates what it would'
    assert np.allclose(a.recording.stacked('shares')[:, 0], shares, atol=1e-6)


def test_key_norm_figure_leaves_the_kv_heads_a_layer_lacks_blank():
    """A model whose blocks differ in G (timm's Sapiens2): past a layer's own KV heads both panels show nothing,
    neither a number nor 'null'."""
    norms = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 3.0, np.nan, np.nan]])
    alloc = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, np.nan, np.nan]])
    top, bottom = figures.key_norm_figure(norms, alloc).data
    assert [list(row) for row in bottom.text] == [['1', '1', '1', '1'], ['2', '2', '', '']]
    assert [list(row) for row in top.text] == [['0', '1', '1', '2'], ['0', '4', '', '']]
    assert list(bottom.z[1]) == [2.0, 2.0, None, None]


def test_ablation_figure_greys_the_kv_heads_a_layer_lacks():
    """Blocks that differ in G: the scale is set by the drops that exist, and a missing KV head is grey, not the
    white of a drop of zero."""
    kv = np.array([[0.02, -0.01, 0.0, 0.03], [0.05, 0.0, np.nan, np.nan]])
    query = np.array([[0.01, 0.0, -0.02, 0.0], [0.0, 0.01, 0.0, 0.0]])
    fig = figures.ablation_figure(kv, query, 'p(ship)')
    assert fig.data[0].zmax == 0.05 and fig.data[0].zmin == -0.05
    assert fig.layout.plot_bgcolor == figures.MISSING_CELL
    assert figures.ablation_figure(kv[:1], query[:1], 'p(ship)').layout.plot_bgcolor != figures.MISSING_CELL


def test_heads_layers_mosaic_tiles_are_the_class_token_maps(analyses):
    a = analyses['embedded/mha']
    rows = a.summary_rows  # (L, H, patches)
    gh, gw = a.recording.grid_size
    z = np.array(figures.heads_layers_figure(rows, (gh, gw)).data[0].z, dtype=float)
    L, H, _ = rows.shape
    assert z.shape == (L * (gh + 1) - 1, H * (gw + 1) - 1)
    tile = z[(gh + 1) * 2:(gh + 1) * 2 + gh, (gw + 1) * 3:(gw + 1) * 3 + gw]
    expected = rows[2, 3].reshape(gh, gw)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert np.allclose(tile, expected)


def test_overlay_keeps_aspect_and_blends():
    view = np.zeros((60, 40, 3), np.uint8)
    heat = np.arange(12.0).reshape(3, 4)
    out = figures.overlay(view, heat, size=120)
    assert out.shape == (120, 80, 3) and out.dtype == np.uint8
    assert out.max() > 0, 'the heat map shows on a black image'


def test_prefix_attention_handles_registers_and_no_prefix():
    maps = np.random.default_rng(0).random((2, 3, 7, 7))
    assert np.array_equal(prefix_attention(maps, 3), maps[..., 0, 3:])
    assert np.allclose(prefix_attention(maps, 0), maps.mean(-2))
    assert np.allclose(prefix_attention(maps, 2, has_class_token=False), maps.mean(-2)[..., 2:])


def full_maps(registry, analysis):
    """(L, H, T, T) maps of the analysed image, recorded in full (what the compact analysis avoids keeping)."""
    loaded = registry.get(analysis.spec)
    x = model_input(loaded, __import__('PIL.Image').Image.fromarray(analysis.view))[1]
    with torch.inference_mode(), record(loaded.model, attention='full') as rec:
        loaded.model(x)
    return rec.result.stacked('attention')[:, 0]


def test_recorded_rollout_equals_a_hand_computation_from_full_maps(analyses, registry):
    for spec in ('embedded/gqa', 'embedded/kdgqa'):
        a = analyses[spec]
        maps = full_maps(registry, a)
        T = maps.shape[-1]
        joint = np.eye(T)
        for layer in maps.max(1):
            m = 0.5 * layer + 0.5 * np.eye(T)
            joint = (m / m.sum(-1, keepdims=True)) @ joint
        assert np.allclose(a.rollout('max'), joint[0, 1:], atol=1e-5)
        for fusion in FUSIONS:  # accumulated layer by layer while the forward ran == all layers at once
            assert np.allclose(a.rollout(fusion), attention_rollout(maps, 1, fusion), atol=1e-5), (spec, fusion)
        assert np.allclose(a.summary_rows, maps[:, :, 0, 1:], atol=1e-6), 'summary rows are the class-token rows'
    with pytest.raises(ValueError, match='fusion'):
        a.rollout('median')


def test_layer_maps_recomputes_one_layers_full_maps(analyses, registry):
    a = analyses['embedded/kdgqa']
    maps = full_maps(registry, a)
    assert np.array_equal(layer_maps(registry.get(a.spec), a, 3), maps[3])


def test_difference_view_zero_for_itself_and_rejects_other_geometry(analyses):
    a = analyses['embedded/gqa']
    rows = a.summary_rows.mean(1)
    fig = figures.difference_figure(rows, rows, a.recording.grid_size)
    assert np.nanmax(np.abs(np.array(fig.data[0].z, dtype=float))) == 0
    assert all(h.endswith('TV 0.00') for line in fig.data[0].customdata for h in line if h)
    with pytest.raises(ValueError, match='share backbone geometry'):
        figures.difference_figure(rows, rows[:, :-4], a.recording.grid_size)
    other = analyses['embedded/mha'].summary_rows.mean(1)
    tv = 0.5 * np.abs(rows - other).sum(-1)
    fig = figures.difference_figure(rows, other, a.recording.grid_size, figures.Fit(275))
    hovers = {h.split(' · ')[0]: float(h.split('TV ')[1]) for line in fig.data[0].customdata for h in line if h}
    assert [hovers[f'L{i}'] for i in range(len(tv))] == pytest.approx(tv, abs=0.006), 'every layer, in a narrow column'
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isfinite(z).sum() == rows.size, 'every patch of every layer is a cell of the mosaic'
    caption = render(a, Choice('difference'), analyses['embedded/mha']).caption
    assert "embedded/mha" in caption and ' '.join(f'{t:.2f}' for t in tv) in caption


def test_allocation_history_traces_are_the_saved_history(analyses):
    dgqa = [a for a in analyses.values() if a.history is not None]
    assert dgqa, 'the embedded family includes DGQA'
    hist = dgqa[0].history[1]
    alloc = np.array(hist['allocation'])
    assert len(hist['steps']) == len(alloc) > 1
    fig = figures.allocation_history_figure(hist['steps'], alloc, 1)
    for g, trace in enumerate(fig.data):
        assert list(trace.y) == list(alloc[:, g]) and list(trace.x) == hist['steps']
    assert 0 not in fig.layout.yaxis.tickvals, 'a y zero tick prints on top of the x zero tick at the corner'
    assert max(fig.layout.yaxis.tickvals) == alloc.sum(1).max()


def test_views_and_zip_export(analyses, registry, tmp_path):
    chosen = [analyses['embedded/mha'], analyses['embedded/kdgqa'], None, analyses['embedded/gqa']]
    assert reference_for(chosen) is chosen[0]
    overlay = render(chosen[1], Choice('overlay', 2, '1'), reference_for(chosen)).picture
    rollout = render(chosen[1], Choice('rollout', fusion='min'), reference_for(chosen)).picture
    assert overlay.shape == rollout.shape and overlay.ndim == 3
    assert abs(sum(header(chosen[1]).top5.values()) - sum(p for _, p in chosen[1].top5)) < 1e-9
    path = export_zip(chosen, 2, 'mean', 'mean', tmp_path / 'a.zip', registry)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert sum(n.endswith('arrays.npz') for n in names) == 3 and sum(n.endswith('meta.json') for n in names) == 3
        assert any(n.endswith('.png') for n in names) and any(n.endswith('assignment.html') for n in names)
        arrays = np.load(io.BytesIO(zf.read('1_embedded_kdgqa/arrays.npz')), allow_pickle=False)
        assert np.array_equal(arrays['query_to_kv'], chosen[1].recording.stacked('query_to_kv')[:, 0])
        assert np.array_equal(arrays['rollout_min'], chosen[1].recording.rollout['min'][0].numpy())
        assert np.array_equal(arrays['full_layer2'], layer_maps(registry.get('embedded/kdgqa'), chosen[1], 2))
        meta = json.loads(zf.read('1_embedded_kdgqa/meta.json'))
        assert meta['row_labels'] == ['class token'] and meta['top5'][0][0] == chosen[1].top5[0][0]
        csv_rows = zf.read('1_embedded_kdgqa/allocations.csv').decode().splitlines()
        L, G = chosen[1].recording.stacked('allocation')[:, 0].shape
        assert len(csv_rows) == 1 + L * G
        png = zf.read('0_embedded_mha/rollout_mean.png')
        from PIL import Image
        assert Image.open(io.BytesIO(png)).size == rollout.shape[1::-1]
        assert '0_embedded_mha/history.json' not in names, 'a view that does not apply to a model is not exported'
        assert '3_embedded_gqa/history.json' not in names and '1_embedded_kdgqa/difference.html' in names
        assert len(names) == len(set(names)), 'no file is written twice'
        picked = json.loads(zf.read('1_embedded_kdgqa/picked_maps.json'))  # the default query: the class token
        assert picked['picked'][0]['token'] == 0 and picked['layer'] == 2 and len(picked['rows']) == 8
        assert '1_embedded_kdgqa/pick.html' in names, "the picked-query view's figure"


def test_exported_attention_png_is_named_for_the_head_it_shows(analyses, tmp_path):
    """Head 20 of an 8-head model is not a head: the view shows the head mean, and the file says so."""
    analysis = analyses['embedded/gqa']
    assert analysis.num_heads < 20
    view = render(analysis, Choice('overlay', 2, '20'))
    mean_view = render(analysis, Choice('overlay', 2, 'mean'))
    assert np.array_equal(view.picture, mean_view.picture) and view.caption == mean_view.caption
    with zipfile.ZipFile(export_zip([analysis], 2, '20', 'mean', tmp_path / 'h.zip')) as zf:
        pngs = [n for n in zf.namelist() if 'attention_layer' in n]
        assert pngs == ['0_embedded_gqa/attention_layer2_head-mean.png'], pngs
        shown = np.asarray(__import__('PIL.Image', fromlist=['Image']).open(io.BytesIO(zf.read(pngs[0]))))
        assert np.array_equal(shown, mean_view.picture)


def test_diversity_view_measures_the_patch_columns_the_other_views_show(analyses):
    """JSD over the summary rows restricted to patch tokens (renormalised), the rows of the overlay and the
    heads x layers views -- not over rows whose class-token / register columns would dominate it."""
    from gqa_core.lens.heads import group_diversity
    analysis = analyses['embedded/gqa']
    rec = analysis.recording
    q2kv = rec.stacked('query_to_kv')[:, 0]
    G = int(analysis.grouping['num_kv_heads'])
    z = np.array(render(analysis, Choice('diversity')).figure.data[0].z, dtype=float)
    assert np.allclose(z, group_diversity(analysis.summary_rows, q2kv, G), equal_nan=True)
    with_prefix = group_diversity(rec.stacked('attention')[:, 0, :, rec.summary_row], q2kv, G)
    assert not np.allclose(z, with_prefix, equal_nan=True), 'the prefix column changes the measure'


def test_long_model_names_are_cut_with_the_full_name_on_hover():
    from gqa_core.lens.models import short_name
    assert short_name('embedded/kdgqa') == 'embedded/kdgqa'
    spec = 'convert:hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k:gqa:3'
    cut = short_name(spec)
    assert cut.startswith(f'<abbr title="{spec}">') and cut.endswith('…</abbr>')
    assert len(cut.split('>')[1].split('<')[0]) == 36, 'at most 36 characters shown'
    assert '&lt;' in short_name('<b>' * 20), 'escaped'


def _seed_result(values):
    """seeds.json as the seeds CLI writes it, from per-seed test top-1 values of each run label."""
    from gqa_core.training.seeds import summarise, verdict
    runs = []
    for label, tops in values.items():
        variant, _, rest = label.partition(' ')
        runs += summarise([dict(variant=variant, seed=s, val_top1=t, test_top1=t) for s, t in enumerate(tops)],
                          f' {rest}' if rest else '')
    by = {r['label']: r for r in runs}
    verdicts = [verdict(r, by['gqa (output-error)' if 'output-error' in r['label'] else 'gqa'])
                for r in runs if r['variant'] != 'gqa']
    return dict(runs=runs, verdicts=verdicts)


def test_seeds_figure_draws_every_seed_and_colours_runs_by_their_verdict():
    result = _seed_result({'gqa': [0.70, 0.71, 0.705], 'kdgqa': [0.60, 0.605, 0.61], 'pgqa': [0.70, 0.72, 0.69],
                           'dgqa-ema': [0.75, 0.751, 0.752], 'gqa (output-error)': [0.71, 0.70, 0.72],
                           'kdgqa (output-error)': [0.71, 0.69, 0.70]})
    fig = figures.seeds_figure(result)
    dots = [t for t in fig.data if t.marker.size == 8]
    means = [t for t in fig.data if t.marker.size == 22]
    assert [list(t.y) for t in dots] == [r['test_top1'] for r in result['runs']]
    assert [t.y[0] for t in means] == pytest.approx([r['test_top1_mean'] for r in result['runs']])
    kinds = {t.x[0]: t.legendgroup for t in means}
    assert kinds == {'GQA': 'reference', 'KDGQA': 'worse', 'PGQA': 'within', 'DGQA-EMA': 'better',
                     'GQA<br>advised': 'reference', 'KDGQA<br>advised': 'within'}
    assert sum(t.showlegend for t in means) == 4  # one legend entry per kind


@pytest.mark.parametrize('extra', [0, 2])
def test_dataset_view_puts_at_most_four_models_in_a_row(extra):
    from gqa_core.lens.explorer import shipped_dataset_stats
    stats = shipped_dataset_stats()
    for i in range(extra):  # two more models, as when the advised runs ship beside the six
        stats['models'][f'copy-{i}'] = stats['models']['kdgqa']
        stats['agreement'][f'copy-{i}'] = stats['agreement']['kdgqa']
        for row in stats['agreement'].values():
            row[f'copy-{i}'] = row['kdgqa']
    keyed = [n for n, s in stats['models'].items() if s['grouping']['variant'] != 'mha']
    agreement, idle, _, per_class, _ = figures.stats_figures(stats)
    assert agreement.data[0].x == tuple(stats['models']) and 'top-1:' not in agreement.layout.title.text
    for fig in (idle, per_class):
        assert [a.text for a in fig.layout.annotations] == keyed
        columns = {round(fig.layout[f'xaxis{i + 1 if i else ""}'].domain[0], 3) for i in range(len(keyed))}
        assert len(columns) == min(4, len(keyed))
        assert len({round(fig.layout[f'yaxis{i + 1 if i else ""}'].domain[0], 3)
                    for i in range(len(keyed))}) == -(-len(keyed) // 4)
