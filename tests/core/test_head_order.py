"""The head-order advisor: head permutations preserve the function, the search finds the best partition, the
advised head order is never worse than consecutive pooling, and it travels with saved models."""
import copy
import itertools
import json

import pytest
import timm
import torch

from gqa_core import convert, from_pretrained, save_pretrained
from gqa_core.core.convert import source_heads
from gqa_core.core.head_order import advise_head_order, permute_heads
from gqa_core.io.hub import ModelLoadError, create_model
from gqa_core.lens.specs import parse_spec

from support import tiny_vit


def test_permuting_heads_preserves_the_function():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for i, block in enumerate(model.blocks):
            permute_heads(block.attn, torch.randperm(3, generator=torch.Generator().manual_seed(i)).tolist())
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)


def test_explicit_grouping_pools_the_named_heads_and_composes_with_kdgqa():
    mha = tiny_vit(num_heads=6, depth=2)
    perms = [[5, 0, 3, 1, 2, 4], [0, 1, 2, 3, 4, 5]]
    model = convert(copy.deepcopy(mha), 'kdgqa', 3, head_order=perms)
    d = 8
    for layer, perm in enumerate(perms):
        k_mha = mha.blocks[layer].attn.qkv.weight[48:96].view(6, d, -1)
        k_new = model.blocks[layer].attn.qkv.weight[48:72].view(3, d, -1)
        for g in range(3):
            assert torch.allclose(k_new[g], k_mha[perm[2 * g:2 * g + 2]].mean(0), atol=1e-6)
        q_mha = mha.blocks[layer].attn.qkv.weight[:48].view(6, d, -1)
        assert torch.equal(model.blocks[layer].attn.qkv.weight[:48].view(6, d, -1), q_mha[perm])
    assert source_heads(model) == perms
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    with pytest.raises(ValueError, match='permutation of 0..5'):
        convert(copy.deepcopy(mha), 'gqa', 3, head_order=[[0, 0, 1, 2, 3, 4], list(range(6))])


def _layer_error_by_hand(attn, x, groups, rows=slice(None)):
    """Per-head loop: each head attends with its group's mean-pooled K/V; error of the projected output in
    the query ``rows`` that count."""
    H, d = attn.num_heads, attn.head_dim
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    out_mha, out_pooled = [], [None] * H
    for h in range(H):
        out_mha.append(torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2) * attn.scale, -1) @ v[:, h])
    for group in groups:
        kg, vg = k[:, list(group)].mean(1), v[:, list(group)].mean(1)
        for h in group:
            out_pooled[h] = torch.softmax(q[:, h] @ kg.transpose(-1, -2) * attn.scale, -1) @ vg
    delta = torch.cat([out_pooled[h] - out_mha[h] for h in range(H)], -1)[:, rows]
    return float((delta @ attn.proj.weight.T).double().pow(2).sum())


PAIRINGS = [((0, a), tuple(sorted({1, 2, 3} - {a}))) for a in (1, 2, 3)]  # 4 heads into 2 pairs


def _small_vit():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_heads=4,
                             embed_dim=64, num_classes=5).eval()


def test_exhaustive_search_finds_the_partition_with_the_least_output_error():
    model = _small_vit()
    images = torch.randn(6, 3, 32, 32)
    advice = advise_head_order(model, 2, images, candidates=1)
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for layer, block in enumerate(model.blocks):
            h = block.norm1(x)
            # only the class token's output reaches the head of this token-pooled model in its last layer
            rows = slice(0, 1) if layer == len(model.blocks) - 1 else slice(None)
            errors = {p: _layer_error_by_hand(block.attn, h, p, rows) for p in PAIRINGS}
            best = min(errors, key=errors.get)
            assert advice.search[layer] == 'exhaustive' and advice.output_divergence[layer] is None
            assert sorted(map(sorted, [advice.permutations[layer][:2], advice.permutations[layer][2:]])) == \
                sorted(map(list, best))
            assert advice.error_advised[layer] == pytest.approx(errors[best], rel=1e-4)
            assert advice.error_consecutive[layer] == pytest.approx(errors[((0, 1), (2, 3))], rel=1e-4)
            x = block(x)


def _kl(reference, output):
    p, q = torch.log_softmax(reference.double(), -1), torch.log_softmax(output.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _with_pooled(model, perms):
    """A copy of ``model`` whose first len(perms) layers are pooled to 2 KV heads by hand, the rest MHA."""
    from gqa_core.core.attention import GroupedQueryAttention
    pooled = copy.deepcopy(model)
    for layer, perm in enumerate(perms):
        attn = copy.deepcopy(model.blocks[layer].attn)
        permute_heads(attn, [h for g in perm for h in g])
        pooled.blocks[layer].attn = GroupedQueryAttention.from_attention(attn, 'gqa', 2)
    return pooled.eval()


def test_model_output_decides_among_the_best_ranked_partitions():
    model = _small_vit()
    images = torch.randn(6, 3, 32, 32)
    advice = advise_head_order(model, 2, images, candidates=3)
    chosen = [tuple(tuple(sorted(p[i:i + 2])) for i in (0, 2)) for p in advice.permutations]
    compared = 0
    with torch.no_grad():
        reference = model(images)
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for layer, block in enumerate(model.blocks):
            rows = slice(0, 1) if layer == len(model.blocks) - 1 else slice(None)
            errors = {p: _layer_error_by_hand(block.attn, block.norm1(x), p, rows) for p in PAIRINGS}
            allowed = [p for p in PAIRINGS if errors[p] <= errors[((0, 1), (2, 3))] * (1 + 1e-6)]
            # layers below keep their chosen grouping, layers above stay multi-head
            kl = {p: _kl(reference, _with_pooled(model, chosen[:layer] + [p])(images)) for p in allowed}
            compared += len(allowed) > 1
            assert chosen[layer] == tuple(sorted(min(kl, key=kl.get)))
            assert advice.output_divergence[layer] == pytest.approx(kl[chosen[layer]], rel=1e-3, abs=1e-9)
            assert advice.error_advised[layer] <= advice.error_consecutive[layer]
            x = block(x)
    assert compared > 0  # some layer had a choice to make on the model's output
    # the last divergence is the converted model's own
    converted = convert(copy.deepcopy(model), 'gqa', 2, head_order=advice.permutations).eval()
    with torch.no_grad():
        assert advice.output_divergence[-1] == pytest.approx(_kl(reference, converted(images)), rel=1e-3)


@pytest.mark.parametrize('name', ['vit_base_patch16_224', 'vit_large_patch16_224'])
def test_advised_error_never_exceeds_consecutive_on_random_weight_vits(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    H = model.blocks[0].attn.num_heads
    advice = advise_head_order(model, H // 2, torch.randn(2, 3, 224, 224), batch=2)
    assert len(advice.permutations) == len(model.blocks)
    assert all(a <= c for a, c in zip(advice.error_advised, advice.error_consecutive))
    assert sum(a < c for a, c in zip(advice.error_advised, advice.error_consecutive)) > len(model.blocks) // 2
    assert all(sorted(p) == list(range(H)) for p in advice.permutations)


def test_advised_model_round_trips_with_its_source_heads(tmp_path):
    torch.manual_seed(0)
    model = create_model('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2, num_classes=5), 'mha')
    images = torch.randn(4, 3, 32, 32)
    advised = convert(copy.deepcopy(model), 'kdgqa', 1, head_order=[[2, 0, 1], [1, 2, 0]])
    save_pretrained(advised, tmp_path / 'adv')
    config = json.loads((tmp_path / 'adv' / 'config.json').read_text())
    assert config['source_heads'] == [[2, 0, 1], [1, 2, 0]]
    loaded = from_pretrained(str(tmp_path / 'adv')).eval()
    assert source_heads(loaded) == [[2, 0, 1], [1, 2, 0]]
    with torch.no_grad():
        assert torch.equal(loaded(images), advised.eval()(images))
    config['source_heads'] = [[0, 0, 1], [1, 2, 0]]
    (tmp_path / 'adv' / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match='source_heads.*permutation'):
        from_pretrained(str(tmp_path / 'adv'))


def test_the_advisor_reads_a_reordered_multi_head_layer_as_it_is():
    """A G = H layer whose heads were reordered keeps its source_heads in the advisor: with BEiT's model-wide
    shared position bias, they say which bias belongs to which head (rebuilding the layer lost them once)."""
    from gqa_core.core.head_order import _multi_head
    torch.manual_seed(0)
    model = timm.create_model('beit_base_patch16_224', img_size=32, embed_dim=64, depth=2, num_heads=4,
                              num_classes=5, use_shared_rel_pos_bias=True, use_rel_pos_bias=False).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.2)
    reordered = convert(copy.deepcopy(model), 'gqa', 4, head_order=[[2, 0, 3, 1]] * 2).eval()
    tokens = torch.randn(3, reordered.patch_embed.num_patches + 1, 64)
    layer, bias = reordered.blocks[0].attn, reordered.rel_pos_bias()
    with torch.no_grad():
        assert torch.equal(_multi_head(layer, 0)(tokens, shared_rel_pos_bias=bias),
                           layer(tokens, shared_rel_pos_bias=bias))


def test_spec_names_the_grouping():
    spec = parse_spec('convert:hub:org/x@v1:kdgqa:4:output-error', ('gqa', 'kdgqa'))
    assert spec.head_order == 'output-error' and spec.source.name == 'org/x' and spec.num_kv_heads == 4
    assert str(spec) == 'convert:hub:org/x@v1:kdgqa:4:output-error'
    assert parse_spec('convert:embedded/mha:gqa:2', ('gqa',)).head_order == 'consecutive'


def test_embedded_conversion_with_advised_grouping_in_the_registry(registry):
    loaded = registry.get('convert:embedded/mha:gqa:4:output-error')
    assert loaded.source_heads is not None and 'advised head order' in loaded.summary()
    assert all(sorted(p) == list(range(8)) for p in loaded.source_heads)


def test_a_work_bound_turns_the_model_output_comparison_off():
    """Live conversions bound the second stage; below one candidate's cost it does not run."""
    model = _small_vit()
    images = torch.randn(6, 3, 32, 32)
    bounded = advise_head_order(model, 2, images, max_refine_flops=1.0)
    layer_error_only = advise_head_order(model, 2, images, candidates=1)
    assert bounded.output_divergence == [None, None]
    assert bounded.permutations == layer_error_only.permutations
    assert advise_head_order(model, 2, images, max_refine_flops=1e12).output_divergence[0] is not None


def test_the_old_name_grouping_still_works_with_a_deprecation_warning(tmp_path):
    """``grouping`` was the head order's name before 0.3 (it now means only what a policy decides per forward)."""
    from gqa_core.training.train import parse_args
    mha = tiny_vit(num_heads=4, depth=1)
    order = [[3, 1, 0, 2]]
    with pytest.warns(DeprecationWarning, match='head_order'):
        old = convert(copy.deepcopy(mha), 'gqa', 2, grouping=order)
    assert source_heads(old) == order == source_heads(convert(copy.deepcopy(mha), 'gqa', 2, head_order=order))
    (tmp_path / 'old.yaml').write_text('grouping: output-error\n')
    assert parse_args(['--data', 'x', '--config', str(tmp_path / 'old.yaml')]).head_order == 'output-error'
    assert parse_args(['--data', 'x', '--grouping', 'output-error']).head_order == 'output-error'
    assert parse_args(['--data', 'x', '--head-order', 'output-error']).head_order == 'output-error'
