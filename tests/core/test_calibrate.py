"""Calibrated conversion (gqa_core.core.calibrate): exact where nothing is shared, better than mean-pooling in
every layer of every family (on the calibration images and on held-out ones), deterministic, all or nothing."""
import copy

import pytest
import torch

from gqa_core import GroupedQueryAttention, convert
from gqa_core.core.calibrate import CalibrationBudget, layer_errors
from gqa_core.core.vit import blocks_of
from gqa_core.io.preprocessing import model_preprocessing
from test_families import FAMILIES, family_model, perturbed_model

BUDGET = CalibrationBudget(steps=20, batch_images=8)
# timm's own ViT layouts besides test_families' ones: a class token with token pooling, registers + layer scale
OWN = {
    'vit': ('vit_small_patch16_224', dict(img_size=64)),
    'dinov2-reg': ('vit_small_patch14_reg4_dinov2', dict(img_size=56)),
}


def model_for(key: str) -> torch.nn.Module:
    return family_model(key) if key in FAMILIES else perturbed_model(*OWN[key])


def noise(model, n: int, seed: int) -> torch.Tensor:
    """``n`` seeded random images of the size the app shows the model (its preprocessing's)."""
    size = model_preprocessing(model)['input_size'][1:]
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('key', sorted(FAMILIES) + sorted(OWN))
def test_calibration_lowers_every_layers_error_on_calibration_and_held_out_images(key):
    model = model_for(key)
    H = blocks_of(model)[0].attn.num_heads
    calibration, held_out = noise(model, 24, 1), noise(model, 16, 2)
    pooled = convert(copy.deepcopy(model), 'gqa', H // 2)
    calibrated = convert(copy.deepcopy(model), 'gqa', H // 2, init='calibrated', calibration=calibration,
                         budget=BUDGET)
    report = calibrated.calibration_report
    assert all(c < m for m, c in zip(report.error_mean_pooled, report.error_calibrated)), report
    before, after = layer_errors(model, pooled, held_out), layer_errors(model, calibrated, held_out)
    assert all(a < b for b, a in zip(before, after)), (before, after)
    # only the attention layers changed
    mine = calibrated.state_dict()
    for name, tensor in model.state_dict().items():
        if '.attn.' not in name:
            assert torch.equal(mine[name], tensor), name


@pytest.mark.parametrize('key', ['vit', 'eva02', 'beit-shared'])
def test_calibrated_at_g_equal_h_keeps_the_model_exactly(key):
    model = model_for(key)
    x = noise(model, 4, 3)
    converted = convert(copy.deepcopy(model), 'gqa', blocks_of(model)[0].attn.num_heads, init='calibrated',
                        calibration=noise(model, 8, 1), budget=BUDGET)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-6


def test_calibration_is_deterministic():
    model = model_for('vit')
    calibration = noise(model, 16, 1)
    a, b = (convert(copy.deepcopy(model), 'kdgqa', 2, init='calibrated', calibration=calibration, budget=BUDGET)
            for _ in range(2))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize('variant, options', [('kdgqa', {}), ('dgqa', {'stat': 'ema'}), ('pgqa', {}),
                                              ('dgqa', {'stat': 'diff', 'compat': 'official'})])
def test_every_variant_is_calibrated_and_its_policy_state_is_kept(variant, options):
    model = model_for('vit')
    calibration = noise(model, 24, 1)
    pooled = convert(copy.deepcopy(model), variant, 2, **options)
    calibrated = convert(copy.deepcopy(model), variant, 2, init='calibrated', calibration=calibration,
                         budget=BUDGET, **options)
    report = calibrated.calibration_report
    assert sum(report.error_calibrated) < sum(report.error_mean_pooled)
    for a, b in zip(blocks_of(pooled), blocks_of(calibrated)):
        for (name, x), y in zip(a.attn.policy.state_dict().items(), b.attn.policy.state_dict().values()):
            assert torch.equal(x, y), f'calibration moved the policy state {name}'


@pytest.mark.parametrize('bad, message', [
    (torch.zeros(0, 3, 64, 64), 'at least 2 images'),
    (torch.zeros(1, 3, 64, 64), 'at least 2 images'),
    (torch.zeros(4, 64, 64), 'at least 2 images'),
    (torch.zeros(4, 3, 32, 32), 'px'),
    (torch.zeros(4, 1, 64, 64), 'channels'),
    (torch.full((4, 3, 64, 64), float('nan')), 'NaN'),
    (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), 'floating point'),
    ([[0.0]], 'tensor'),
    (None, 'needs calibration images'),
])
def test_bad_calibration_input_is_refused_and_leaves_the_model_untouched(bad, message):
    model = model_for('vit')
    before = copy.deepcopy(model.state_dict())
    kinds = [type(b.attn) for b in blocks_of(model)]
    with pytest.raises(ValueError, match=message):
        convert(model, 'gqa', 2, init='calibrated', calibration=bad, budget=BUDGET)
    assert [type(b.attn) for b in blocks_of(model)] == kinds
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_failure_during_calibration_leaves_the_model_untouched(monkeypatch):
    import gqa_core.core.calibrate as calibrate
    model = model_for('vit')
    before = copy.deepcopy(model.state_dict())
    calls = []

    def fail_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('boom')
        return original(*args, **kwargs)

    original = calibrate._calibrate_layer
    monkeypatch.setattr(calibrate, '_calibrate_layer', fail_on_second_layer)
    with pytest.raises(RuntimeError, match='boom'):
        convert(model, 'gqa', 2, init='calibrated', calibration=noise(model, 8, 1), budget=BUDGET)
    assert not any(isinstance(b.attn, GroupedQueryAttention) for b in blocks_of(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_the_flop_cap_bounds_the_steps_and_kv_only_moves_only_kv_rows():
    model = model_for('vit')
    calibration = noise(model, 16, 1)
    capped = convert(copy.deepcopy(model), 'gqa', 2, init='calibrated', calibration=calibration,
                     budget=CalibrationBudget(steps=50, batch_images=8, max_flops=0.0))
    assert capped.calibration_report.steps_per_layer == 0 and capped.calibration_report.flops == 0
    pooled = convert(copy.deepcopy(model), 'gqa', 2)
    kv = convert(copy.deepcopy(model), 'gqa', 2, init='calibrated', calibration=calibration,
                 budget=CalibrationBudget(steps=10, batch_images=8, params='kv'))
    for a, b in zip(blocks_of(pooled), blocks_of(kv)):
        q = a.attn.qkv_split[0]
        assert torch.equal(a.attn.qkv.weight[:q], b.attn.qkv.weight[:q])  # Q rows untouched
        assert torch.equal(a.attn.proj.weight, b.attn.proj.weight)
        assert not torch.equal(a.attn.qkv.weight[q:], b.attn.qkv.weight[q:])


@pytest.mark.parametrize('field, value', [('steps', -1), ('steps', 1.5), ('steps', True), ('batch_images', 0),
                                          ('lr', 0.0), ('lr', 'fast'), ('max_flops', float('inf')),
                                          ('max_flops', '1e12'), ('params', 'everything'), ('seed', 1.5)])
def test_a_bad_budget_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        CalibrationBudget(**{field: value})


@pytest.mark.parametrize('key', ['beit-shared', 'relpos-shared'])
def test_a_shared_position_bias_follows_the_head_order_the_calibration_fits(key):
    """A model-wide bias (BEiT's, timm's srelpos ViT's) is in the original head order: with a permuted grouping
    the target calibration fits (the MHA block's outputs) must still be the MHA model's, which the report's
    mean-pooled errors show."""
    model = model_for(key)
    H = blocks_of(model)[0].attn.num_heads
    order = [list(reversed(range(H))), [1, 3, 0, 2]][:len(blocks_of(model))]
    calibration = noise(model, 24, 1)
    pooled = convert(copy.deepcopy(model), 'gqa', H // 2, head_order=order)
    calibrated = convert(copy.deepcopy(model), 'gqa', H // 2, head_order=order, init='calibrated',
                         calibration=calibration, budget=BUDGET)
    expected = layer_errors(model, pooled, calibration[:32])
    assert calibrated.calibration_report.error_mean_pooled == pytest.approx(expected, rel=1e-3)
