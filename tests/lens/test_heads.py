"""Which heads matter: batched ablation equals removing a head's K/V by hand, the diversity and faithfulness
numbers equal hand computations, and every panel shows in a column."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gqa_core import convert, record
from gqa_core.core.ablation import ablate
from gqa_core.core.attention import GroupedQueryAttention, key_head_norms
from gqa_core.lens.heads import ablation_study, deletion_insertion, group_diversity, jensen_shannon

from support import tiny_vit


def _forward_with_kv_replaced(model, x, layer_index, kv_head, mode):
    """The model with one layer's KV head zeroed or mean-replaced by hand, after its policy routed the queries:
    each layer computed head by head."""
    def layer_forward(attn, x_in):
        B, N, _ = x_in.shape
        q, k, v = attn.qkv(x_in).split(attn.qkv_split, dim=-1)
        q = attn.q_norm(q.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2))
        k = attn.k_norm(k.view(B, N, attn.num_kv_heads, attn.head_dim).transpose(1, 2))
        v = v.view(B, N, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        grouping = attn.policy(key_head_norms(k))  # routing decided on the real keys
        routing = grouping.query_to_kv
        if routing is None:
            routing = torch.arange(attn.num_heads) // (attn.num_heads // attn.num_kv_heads)
        routing = routing.expand(B, -1) if routing.dim() == 1 else routing
        if attn is model.blocks[layer_index].attn:
            k, v = k.clone(), v.clone()
            if mode == 'zero':
                k[:, kv_head] = 0
                v[:, kv_head] = 0
            else:
                k[:, kv_head] = k[:, kv_head].mean(1, keepdim=True)
                v[:, kv_head] = v[:, kv_head].mean(1, keepdim=True)
        outs = []
        for h in range(attn.num_heads):
            kk = k[torch.arange(B), routing[:, h]]
            vv = v[torch.arange(B), routing[:, h]]
            outs.append(torch.softmax(q[:, h] @ kk.transpose(-1, -2) * attn.scale, -1) @ vv)
        out = torch.stack(outs, 1).transpose(1, 2).reshape(B, N, -1)
        return attn.proj(attn.norm(out))

    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            h = h + block.ls1(layer_forward(block.attn, block.norm1(h)))
            h = h + block.ls2(block.mlp(block.norm2(h)))
        return model.forward_head(model.norm(h))


@pytest.mark.parametrize('variant', ['gqa', 'kdgqa'])
@pytest.mark.parametrize('mode', ['zero', 'mean'])
def test_removing_a_kv_head_equals_replacing_its_kv_by_hand(variant, mode):
    model = convert(tiny_vit(num_heads=6, depth=3), variant, 3)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    L, G, H = 3, 3, 6
    kv = torch.zeros(L * G, L, G, dtype=torch.bool)
    for i in range(L * G):
        kv[i, i // G, i % G] = True
    with torch.no_grad(), ablate(model, kv_heads=kv, mode=mode):
        batched = model(x.expand(L * G, -1, -1, -1))
    for i in range(L * G):
        by_hand = _forward_with_kv_replaced(model, x, i // G, i % G, mode)
        assert torch.allclose(batched[i], by_hand[0], atol=1e-4), (variant, mode, i)
    with torch.no_grad(), record(model, attention='none') as rec:
        plain = model(x)
    serves = rec.result.stacked('allocation')[:, 0] > 0  # (L, G): KV heads with queries in this forward
    assert serves.sum() > L, 'the test needs KV heads that serve queries'
    for i in range(L * G):
        changed = not torch.allclose(batched[i], plain[0], atol=1e-6)
        assert changed == bool(serves[i // G, i % G]), ('a removal changes the output exactly when the KV head '
                                                          'serves a query head', variant, mode, i)


def test_query_head_removal_and_study_shapes():
    model = convert(tiny_vit(num_heads=6, depth=2), 'kdgqa', 3)
    x = torch.randn(1, 3, 32, 32)
    result = ablation_study(model, x, target=3, target_name='three')
    assert result.kv['zero'].shape == (2, 3) and result.query['mean'].shape == (2, 6)
    with torch.no_grad():
        base = model(x).softmax(-1)[0, 3]
        q = torch.zeros(1, 2, 6, dtype=torch.bool)
        q[0, 1, 4] = True
        with ablate(model, query_heads=q, mode='zero'):
            removed = model(x).softmax(-1)[0, 3]
    assert result.query['zero'][1, 4] == pytest.approx(float(base - removed), abs=1e-6)
    assert result.target == 'p(three)' and result.base_score == pytest.approx(float(base), abs=1e-6)
    with pytest.raises(ValueError, match='mode must be one of'):
        ablate(model, query_heads=q, mode='half')


def test_diversity_is_the_mean_pairwise_jensen_shannon_divergence():
    rng = np.random.default_rng(0)
    rows = rng.random((2, 4, 10))
    rows /= rows.sum(-1, keepdims=True)
    q2kv = np.array([[0, 0, 0, 1], [1, 1, 0, 0]])
    div = group_diversity(rows, q2kv, 2)

    def jsd(p, q):
        m = (p + q) / 2
        return 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    assert div[0, 0] == pytest.approx(np.mean([jsd(rows[0, a], rows[0, b]) for a, b in ((0, 1), (0, 2), (1, 2))]))
    assert np.isnan(div[0, 1]), 'one query head: no pair'
    assert div[1, 1] == pytest.approx(jsd(rows[1, 0], rows[1, 1]))
    assert jensen_shannon(rows[0, 0], rows[0, 0]) == pytest.approx(0)
    assert jensen_shannon(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1)


def test_deletion_and_insertion_auc_equal_a_hand_computation():
    model = convert(tiny_vit(num_heads=6, depth=2), 'gqa', 3)  # 32 px, patch 8: a 4 x 4 grid
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ranking = np.random.default_rng(3).random(16)
    result = deletion_insertion(model, x, ranking, (4, 4), target=7, steps=16)
    order = np.argsort(-ranking)
    dele, ins = [], []
    with torch.no_grad():
        for k in range(17):  # one forward per point, patches blanked in a loop
            removed, shown = x.clone(), torch.zeros_like(x)
            for p in order[:k]:
                r, c = divmod(int(p), 4)
                removed[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
                shown[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = x[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            dele.append(float(model(removed).softmax(-1)[0, 7]))
            ins.append(float(model(shown).softmax(-1)[0, 7]))
    fractions = np.arange(17) / 16
    assert np.allclose(result['deletion'], dele, atol=1e-6) and np.allclose(result['insertion'], ins, atol=1e-6)
    area = lambda y: sum((y[i] + y[i + 1]) / 2 / 16 for i in range(16))  # noqa: E731
    assert result['deletion_auc'] == pytest.approx(area(dele), abs=1e-6)
    assert result['insertion_auc'] == pytest.approx(area(ins), abs=1e-6)
    assert np.allclose(result['fractions'], fractions)
    with torch.no_grad():
        plain = float(model(x).softmax(-1)[0, 7])
    assert result['deletion'][0] == pytest.approx(plain, abs=1e-6), 'the unperturbed point is part of the curve'


def test_every_embedded_column_shows_the_new_panels(analyses):
    from gqa_core.lens.views import Choice, render
    for spec, a in analyses.items():
        assert a.ablation is not None and a.faithfulness is not None, spec
        kv_heat, q_heat = render(a, Choice('ablation', 1, mode='mean')).figure.data
        assert np.allclose(np.array(kv_heat.z, dtype=float), a.ablation.kv['mean'])
        assert np.allclose(np.array(q_heat.z, dtype=float), a.ablation.query['mean'])
        faith = render(a, Choice('faithfulness'))
        assert [t.name for t in faith.figure.data] == ['class token map −', 'class token map +', 'rollout −', 'rollout +']
        auc = a.faithfulness['class token map']['deletion_auc']
        assert f'class token map: deletion AUC {auc:.3f}' in faith.caption
        left, right = render(a, Choice('key_norms')).figure.data
        assert np.array_equal(np.array(right.z), a.recording.stacked('allocation')[:, 0])
        if a.grouping['variant'] == 'gqa':  # static groups: the left panel still shows the keys' own ratios
            assert not np.allclose(np.array(left.z, dtype=float), 0.25)
