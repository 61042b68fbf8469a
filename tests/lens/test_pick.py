"""The picked query: a place on the picture maps to the right token in each model's own grid (never transposed,
registers counted), and its maps recomputed from the kept queries and keys are the recorded ones."""
import numpy as np
import pytest
import timm
import torch

from gqa_core import convert, record
from gqa_core.lens.pick import parse_query, pick_figure, pick_place, picked_maps, prefix_names
from gqa_core.lens.views import Choice, render
from support import tiny_vit


def recorded(model, size):
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(model, attention='full', keep_qk=True) as rec:
        model(x)
    return rec.result


@pytest.fixture(scope='module')
def registers_non_square():
    """4 registers + a class token, a 2 x 4 patch grid (32 x 64 px input, 16 px patches)."""
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch16_224', img_size=(32, 64), patch_size=16, embed_dim=48,
                              num_heads=6, depth=2, reg_tokens=4, num_classes=5).eval()
    return recorded(convert(model, 'kdgqa', 3), (32, 64))


def test_a_place_picks_its_row_and_column_never_the_transpose(registers_non_square):
    rec = registers_non_square
    assert tuple(rec.grid_size) == (2, 4) and rec.num_prefix_tokens == 5
    top_right = pick_place(rec, (0.99, 0.01))
    assert (top_right.row, top_right.col, top_right.token) == (0, 3, 5 + 3), 'row 0, the last column'
    bottom_left = pick_place(rec, (0.0, 0.99))
    assert (bottom_left.row, bottom_left.col, bottom_left.token) == (1, 0, 5 + 4)
    assert pick_place(rec, (1.0, 1.0)).token == 5 + 7, 'the far edge belongs to the last cell'
    assert prefix_names(rec) == ['class token', 'register 0', 'register 1', 'register 2', 'register 3']
    assert pick_place(rec, 'register 2').token == 3 and pick_place(rec, 'register 2').row is None


@pytest.mark.parametrize('bad,message', [((1.5, 0.2), 'x must be a number 0..1'), ((0.2, -0.1), 'y must be'),
                                         (('left', 0.2), 'x must be a number'), ((float('nan'), 0), 'x must be'),
                                         ('register 9', "no 'register 9' token"), ((0.1,), 'a pick is')])
def test_bad_places_are_refused_with_one_line(registers_non_square, bad, message):
    with pytest.raises(ValueError, match=message):
        pick_place(registers_non_square, bad)


def test_one_place_maps_into_each_models_own_grid(registers_non_square):
    square = recorded(convert(tiny_vit(num_heads=6, depth=2), 'gqa', 3), (32, 32))  # 4 x 4, one class token
    place = (0.6, 0.3)
    a, b = pick_place(square, place), pick_place(registers_non_square, place)
    assert (a.row, a.col, a.token) == (1, 2, 1 + 1 * 4 + 2)
    assert (b.row, b.col, b.token) == (0, 2, 5 + 2)


@pytest.mark.parametrize('variant,G', [('gqa', 3), ('kdgqa', 3), ('mha', None)])
def test_rows_and_columns_from_kept_qk_are_the_recorded_maps(variant, G):
    rec = recorded(convert(tiny_vit(num_heads=6, depth=2), variant, G), (32, 32))
    full = rec.layers[1].attention[0].numpy()  # (H, T, T)
    for place in ((0.1, 0.9), 'class token'):
        maps = picked_maps(rec, 1, [place])
        t = maps.picks[0].token
        assert np.allclose(maps.rows, full[:, t, 1:], atol=1e-5)
        assert np.allclose(maps.columns, full[:, 1:, t], atol=1e-5)
        assert sorted(h for g in maps.groups for h in g) == list(range(6))
        assert maps.key_norms.shape == (rec.layers[1].keys.shape[1], 16)


def test_the_view_arranges_heads_by_kv_group_and_reports_bad_queries(registers_non_square):
    from gqa_core.lens.analysis import Analysis
    rec = registers_non_square
    analysis = Analysis('x', np.zeros((32, 64, 3), np.uint8), rec, [], dict(variant='kdgqa', num_kv_heads=3))
    shown = render(analysis, Choice('pick', 1, query='0.99, 0.01', width=375))
    assert shown.applies and 'patch (row 0, column 3)' in shown.caption
    maps = picked_maps(rec, 1, parse_query('0.99, 0.01', rec))
    labels = [a.text for a in shown.figure.layout.annotations]
    assert labels.count('mean') == 1 and [f'K{g} norm' for g in range(3)] == [t for t in labels if t.startswith('K')]
    assert sorted(int(t[1:]) for t in labels if t.startswith('q')) == list(range(6))
    assert len(shown.figure.layout.shapes) == len(labels), 'the picked patch is outlined in every tile'
    width = max(len(g) for g in maps.groups) + 1
    lines = -(-3 // max(1, 8 // width)) + 1  # the groups that fit a line of 8 tiles share it, then the mean
    assert pick_figure(maps, rec.grid_size).data[0].z.shape[0] == lines * 3 - 1
    for query, message in (('2, 3', 'x must be'), ('register 7', "no 'register 7'"), ('a, b, c', 'give x, y')):
        refused = render(analysis, Choice('pick', 1, query=query))
        assert not refused.applies and message in refused.caption


def test_the_geometry_view_projects_one_kv_groups_queries_and_keys(registers_non_square):
    from gqa_core.lens.analysis import Analysis
    from gqa_core.lens.geometry import group_geometry
    rec = registers_non_square
    geo = group_geometry(rec, 1, 4, [(0.99, 0.01)])
    route = rec.layers[1].query_to_kv[0]
    assert geo.kv_head == int(route[4]) and geo.heads == [h for h in range(6) if route[h] == geo.kv_head]
    T = 5 + 8
    assert geo.keys.shape == (T, 2) and all(q.shape == (T, 2) for q in geo.queries) and 0 < geo.explained <= 1
    assert geo.token_labels[:5] == ['class token'] + [f'register {i}' for i in range(4)]
    assert geo.token_labels[geo.picks[0].token] == 'patch (0, 3)'
    # the plane is the top-2 principal plane: no other 2-D projection keeps more of the centred points' spread
    points = torch.cat([rec.layers[1].queries[0, geo.heads].float().reshape(-1, 8), rec.layers[1].keys[0, geo.kv_head]
                        .float()])
    kept = np.concatenate(geo.queries + [geo.keys])
    centred = (points - points.mean(0)).numpy()
    assert (kept ** 2).sum() >= (centred[:, :2] ** 2).sum() - 1e-4
    analysis = Analysis('x', np.zeros((32, 64, 3), np.uint8), rec, [], dict(variant='kdgqa', num_kv_heads=3))
    shown = render(analysis, Choice('geometry', 1, head='4', query='register 1', width=375))
    assert shown.applies and 'ringed: the register 1' in shown.caption
    assert [t.name for t in shown.figure.data] == [f'K{geo.kv_head} keys'] + [f'q{h}' for h in geo.heads] + ['picked']


def test_several_places_average_their_maps_once_each(registers_non_square):
    rec = registers_non_square
    places = parse_query('0.99, 0.01; 0.0, 0.99 ;0.99,0.01', rec)
    assert places == [('0.99', '0.01'), ('0.0', '0.99'), ('0.99', '0.01')]
    both = picked_maps(rec, 1, places)
    assert [p.token for p in both.picks] == [5 + 3, 5 + 4], 'the same token picked twice counts once'
    one, other = (picked_maps(rec, 1, [p]) for p in places[:2])
    assert np.allclose(both.rows, (one.rows + other.rows) / 2) and np.allclose(both.columns,
                                                                                (one.columns + other.columns) / 2)
    assert both.label == '2 picked tokens (maps averaged)'
    assert len(pick_figure(both, rec.grid_size).layout.shapes) == 2 * len(pick_figure(one, rec.grid_size).layout.shapes)
    with pytest.raises(ValueError, match='at most 16'):
        parse_query('; '.join(['0.5, 0.5'] * 17), rec)
    with pytest.raises(ValueError, match='characters'):
        parse_query('0.5, 0.5; ' * 60, rec)


def test_every_token_has_a_place_that_picks_it(registers_non_square):
    from gqa_core.lens.pick import token_places
    rec = registers_non_square
    places = token_places(rec)
    assert len(places) == 5 + 8
    assert [pick_place(rec, parse_query(text, rec)[0]).token for text in places] == list(range(13))


@pytest.fixture(scope='module')
def attention_pooled():
    """A model whose head reads an attention-pooling query (timm's AttentionPoolLatent, global_pool='map')."""
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, embed_dim=48, num_heads=6, depth=2,
                              class_token=False, global_pool='map', num_classes=5).eval()
    return recorded(convert(model, 'gqa', 2), (32, 32))


def test_the_attention_pool_query_is_picked_alone_and_shows_the_pools_map(attention_pooled):
    from gqa_core.lens.geometry import group_geometry
    from gqa_core.lens.pick import POOL_QUERY, pick_caption, pick_names
    rec = attention_pooled
    assert POOL_QUERY in pick_names(rec) and POOL_QUERY not in prefix_names(rec)
    maps = picked_maps(rec, 0, [POOL_QUERY])
    assert maps.picks[0].token is None and maps.columns is None and maps.key_norms is None
    assert np.allclose(maps.rows, rec.pool_attention[0].numpy()) and np.allclose(maps.rows.sum(-1), 1, atol=1e-5)
    assert 'the layer does not apply' in pick_caption(maps)
    labels = [a.text for a in pick_figure(maps, rec.grid_size).layout.annotations]
    assert not [t for t in labels if t.startswith('K')], 'the pool has no shared key head to show'
    with pytest.raises(ValueError, match='picked alone'):
        picked_maps(rec, 0, [POOL_QUERY, (0.5, 0.5)])
    with pytest.raises(ValueError, match='not a token of the blocks'):
        group_geometry(rec, 0, 0, [POOL_QUERY])


def test_the_geometry_points_carry_the_place_that_picks_their_token(registers_non_square):
    from gqa_core.lens.geometry import geometry_figure, group_geometry
    rec = registers_non_square
    geo = group_geometry(rec, 1, 0, [(0.99, 0.01), 'register 1'])
    fig = geometry_figure(geo)
    for trace in fig.data[:-1]:
        for t in (0, 3, 5 + 3):
            assert pick_place(rec, parse_query(trace.customdata[t], rec)[0]).token == t
    assert len(fig.data[-1].x) == 2 * (len(geo.heads) + 1), 'each pick ringed in every head and in the keys'


def test_an_mha_groups_its_heads_as_a_conversion_of_the_run_would_share_keys():
    from gqa_core.lens.analysis import Analysis, Pooling
    from gqa_core.lens.views import plan_pooling
    rec = recorded(convert(tiny_vit(num_heads=6, depth=2), 'mha', None), (32, 32))
    order = [[4, 1, 0, 3, 2, 5], [0, 1, 2, 3, 4, 5]]
    maps = picked_maps(rec, 0, [(0.3, 0.3)], Pooling(3, 'x', order).groups(0, 6))
    assert maps.groups == [[1, 4], [0, 3], [2, 5]] and maps.pooled
    keys = rec.layers[0].keys[0].float()
    assert np.allclose(maps.key_norms[0], ((keys[4] + keys[1]) / 2).norm(dim=-1)[1:].numpy(), atol=1e-5)
    assert np.allclose(maps.rows, picked_maps(rec, 0, [(0.3, 0.3)]).rows), 'grouping moves tiles, not maps'
    mha = Analysis('embedded/mha', np.zeros((32, 32, 3), np.uint8), rec, [], dict(variant='mha', num_kv_heads=6))
    gqa = Analysis('embedded/gqa', np.zeros((32, 32, 3), np.uint8), rec, [], dict(variant='gqa', num_kv_heads=2))
    advised = Analysis('a', np.zeros((32, 32, 3), np.uint8), rec, [], dict(variant='gqa', num_kv_heads=3),
                       source_heads=order)
    plan_pooling([mha, gqa, advised])
    assert mha.pooling == Pooling(3, 'a (advised head order)', order) and gqa.pooling is None
    plan_pooling([mha, gqa])
    assert mha.pooling == Pooling(2, 'embedded/gqa (consecutive heads)') and mha.pooling.groups(1, 6) == [[0, 1, 2],
                                                                                                         [3, 4, 5]]
    plan_pooling([mha])
    assert mha.pooling.num_kv_heads == 3
    shown = render(mha, Choice('pick', 0, query='0.3, 0.3', width=570))
    assert 'grouped as pairs of consecutive heads' in shown.caption
    assert [a.text for a in shown.figure.layout.annotations if a.text.startswith('K')] == [f'K{g} pooled'
                                                                                         for g in range(3)]


def test_the_view_shows_who_looks_at_the_picked_token_on_request(registers_non_square):
    from gqa_core.lens.analysis import Analysis
    rec = registers_non_square
    analysis = Analysis('x', np.zeros((32, 64, 3), np.uint8), rec, [], dict(variant='kdgqa', num_kv_heads=3))
    looks, looked_at = (render(analysis, Choice('pick', 1, query='0.99, 0.01', side=side, width=570))
                        for side in ('rows', 'columns'))
    assert looked_at.caption.startswith('how much each patch looks at the patch (row 0, column 3)')
    maps = picked_maps(rec, 1, [(0.99, 0.01)])
    from gqa_core.lens.figures import Fit
    assert not np.array_equal(looks.figure.data[0].z, looked_at.figure.data[0].z, equal_nan=True)
    assert np.array_equal(looked_at.figure.data[0].z,
                          pick_figure(maps, rec.grid_size, Fit(570), side='columns').data[0].z, equal_nan=True)
    with pytest.raises(ValueError, match='side must be one of'):
        Choice('pick', side='diagonal')
