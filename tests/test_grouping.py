"""The grouping advisor: head permutations preserve the function, the search finds the best partition, the
advised grouping is never worse than consecutive pooling, and it travels with saved models."""
import copy
import itertools
import json

import pytest
import timm
import torch

from gqa_core import convert, from_pretrained, save_pretrained
from gqa_core.core.convert import source_heads
from gqa_core.core.grouping import advise_grouping, permute_heads
from gqa_core.training.hub import ModelLoadError, create_model
from gqa_core.lens.specs import parse_spec

from conftest import tiny_vit


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
    model = convert(copy.deepcopy(mha), 'kdgqa', 3, grouping=perms)
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
        convert(copy.deepcopy(mha), 'gqa', 3, grouping=[[0, 0, 1, 2, 3, 4], list(range(6))])


def _layer_error_by_hand(attn, x, groups):
    """Per-head loop: each head attends with its group's mean-pooled K/V; error of the projected output."""
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
    delta = torch.cat([out_pooled[h] - out_mha[h] for h in range(H)], -1)
    return float((delta @ attn.proj.weight.T).double().pow(2).sum())


def test_exhaustive_search_finds_the_partition_with_the_least_output_error():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_heads=4,
                              embed_dim=64).eval()
    images = torch.randn(6, 3, 32, 32)
    advice = advise_grouping(model, 2, images)
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for layer, block in enumerate(model.blocks):
            h = block.norm1(x)
            partitions = [((0, a), tuple(sorted({1, 2, 3} - {a}))) for a in (1, 2, 3)]
            errors = {p: _layer_error_by_hand(block.attn, h, p) for p in partitions}
            best = min(errors, key=errors.get)
            assert advice.search[layer] == 'exhaustive'
            assert sorted(map(sorted, [advice.permutations[layer][:2], advice.permutations[layer][2:]])) == \
                sorted(map(list, best))
            assert advice.error_advised[layer] == pytest.approx(errors[best], rel=1e-4)
            assert advice.error_consecutive[layer] == pytest.approx(errors[((0, 1), (2, 3))], rel=1e-4)
            x = block(x)


@pytest.mark.parametrize('name', ['vit_base_patch16_224', 'vit_large_patch16_224'])
def test_advised_error_never_exceeds_consecutive_on_random_weight_vits(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    H = model.blocks[0].attn.num_heads
    advice = advise_grouping(model, H // 2, torch.randn(2, 3, 224, 224), batch=2)
    assert len(advice.permutations) == len(model.blocks)
    assert all(a <= c for a, c in zip(advice.error_advised, advice.error_consecutive))
    assert sum(a < c for a, c in zip(advice.error_advised, advice.error_consecutive)) > len(model.blocks) // 2
    assert all(sorted(p) == list(range(H)) for p in advice.permutations)


def test_advised_model_round_trips_with_its_source_heads(tmp_path):
    torch.manual_seed(0)
    model = create_model('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2, num_classes=5), 'mha')
    images = torch.randn(4, 3, 32, 32)
    advised = convert(copy.deepcopy(model), 'kdgqa', 1, grouping=[[2, 0, 1], [1, 2, 0]])
    advised.gqa_lens_backbone = model.gqa_lens_backbone
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


def test_spec_names_the_grouping():
    spec = parse_spec('convert:hub:org/x@v1:kdgqa:4:output-error', ('gqa', 'kdgqa'))
    assert spec.grouping == 'output-error' and spec.source.name == 'org/x' and spec.num_kv_heads == 4
    assert str(spec) == 'convert:hub:org/x@v1:kdgqa:4:output-error'
    assert parse_spec('convert:embedded/mha:gqa:2', ('gqa',)).grouping == 'consecutive'


def test_embedded_conversion_with_advised_grouping_in_the_registry(registry):
    loaded = registry.get('convert:embedded/mha:gqa:4:output-error')
    assert loaded.source_heads is not None and 'advised head grouping' in loaded.summary()
    assert all(sorted(p) == list(range(8)) for p in loaded.source_heads)
