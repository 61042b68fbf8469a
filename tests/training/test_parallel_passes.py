"""One process against two real gloo processes (``accelerate launch``): every dataset pass gives the one-process
result -- no image counted twice from the distributed sampler's padding, none missed.

The splits are cut to 101 images (odd, and not a multiple of the batch): each process's last batch is short
and accelerate pads one of them, so a pass that counted padding would report 102 images and other figures.
"""
import json
import math

import pytest

from gqa_core.io.hub import create_model, save_pretrained
from support import ROOT
from support.launch import run_tool

MODELS = ROOT / 'assets' / 'models'
IMAGES = '101'


def one_and_two(tmp_path, module, args, out_flag, written):
    """The tool's result file written by one process and by two: ``(one, two)``, parsed."""
    results = []
    for processes in (1, 2):
        out = tmp_path / f'p{processes}'
        out.mkdir()
        run_tool([module, *args, out_flag, str(out / written if out_flag == '--json' else out)], processes)
        results.append(json.loads((out / written).read_text()))
    return results


def test_evaluate_two_processes_give_the_one_process_result(tmp_path, cifar_subset):
    """KDGQA: per-image allocations, so the mean allocation is a real sum over images (integers: exact)."""
    args = [str(MODELS / 'kdgqa'), '--data', str(cifar_subset), '--limit', IMAGES, '--batch-size', '16',
            '--device', 'cpu']
    one, two = one_and_two(tmp_path, 'gqa_core.evaluate', args, '--json', 'evaluate.json')
    assert (one['processes'], two['processes']) == (1, 2)
    assert one['n'] == two['n'] == int(IMAGES)
    for key in ('top1', 'top5', 'per_class', 'mean_allocation'):
        assert one[key] == two[key], key


def test_stats_two_processes_give_the_one_process_stats(tmp_path, cifar_subset):
    """Every figure is built from integer counts (the entropy from the allocation histogram): equal exactly."""
    models = [str(MODELS / name) for name in ('kdgqa', 'gqa', 'dgqa-diff')]
    args = [*models, '--data', str(cifar_subset), '--limit', IMAGES, '--no-html', '--device', 'cpu']
    one, two = one_and_two(tmp_path, 'gqa_core.stats', args, '--out', 'stats.json')
    assert (one.pop('processes'), two.pop('processes')) == (1, 2)
    assert one['n'] == two['n'] == int(IMAGES)
    assert one == two


@pytest.fixture(scope='module')
def tiny_mha(tmp_path_factory):
    """A small random multi-head ViT (6 heads, 32 px) saved as a GQA Lens model: the explorer's G = 1, 2, 3."""
    folder = tmp_path_factory.mktemp('tiny-mha')
    model = create_model('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, embed_dim=24, depth=2,
                                                      num_heads=6, mlp_ratio=2.0, num_classes=10), 'mha')
    preprocessing = dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3, interpolation='bicubic',
                         crop_pct=1.0)
    save_pretrained(model, folder, labels=[f'c{i}' for i in range(10)], preprocessing=preprocessing)
    return folder


def test_kv_budget_two_processes_give_the_one_process_rows(tmp_path, cifar_subset, tiny_mha):
    """Top-1 and agreement are integer counts added up over the processes; the advisor's head orders (output-error
    rows) are chosen on the same error sums: the rows are equal exactly."""
    args = [str(tiny_mha), '--data', str(cifar_subset), '--limit', IMAGES, '--calibration-images', '37',
            '--device', 'cpu']
    one, two = one_and_two(tmp_path, 'gqa_core.kv_budget', args, '--out', 'kv_budget.json')
    assert (one.pop('processes'), two.pop('processes')) == (1, 2)
    assert one['n'] == two['n'] == int(IMAGES)
    assert any(row['head_order'] == 'output-error' for row in one['rows'])
    assert one == two


def test_head_order_advisor_scoring_split_between_processes(tmp_path):
    """Each process scores its part of the calibration images and the sums are all-reduced: every process makes
    the one-process choices (exhaustive + model-output comparison, exact DP, swaps). The errors are float sums
    in another order -- float32 per-batch partial sums over different batches, then float64 -- so they agree
    to about 1e-6 relative (float32's 6e-8 over a few dozen terms), not bit for bit."""
    for processes in (1, 2):
        run_tool(['support.advise_in_processes', str(tmp_path / f'p{processes}')], processes)
    one = json.loads((tmp_path / 'p1' / 'rank0.json').read_text())
    ranks = [json.loads((tmp_path / 'p2' / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert one['processes'] == 1 and all(rank['processes'] == 2 for rank in ranks)
    assert ranks[0] == ranks[1], 'every process holds the same all-reduced result'
    two = ranks[0]
    for case in ('exhaustive', 'exact', 'swap'):
        assert one[case]['permutations'] == two[case]['permutations'], case
        assert one[case]['search'] == two[case]['search'], case
        for key in ('error_consecutive', 'error_advised', 'output_divergence'):
            for a, b in zip(one[case][key], two[case][key]):
                assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12), (case, key, a, b)
    assert any(p != sorted(p) for p in one['exhaustive']['permutations']), 'the advisor chose a non-trivial order'


def test_calibrated_conversion_closed_form_split_between_processes(tmp_path):
    """The closed form's sums (query covariances, routing counts, the value fit's normal equations) over each
    process's part, all-reduced: both processes end with the same weights, and with the one-process weights up
    to the float order of those sums. The normal equations are float32 chunk products (relative error ~1e-7),
    amplified by the ridge solve and carried through 5 Adam steps: 2e-6 at most was seen on weights of order
    0.1 - 1, so 1e-5 absolute (1e-4 relative) is the bound; a closed form on one process's part alone misses
    it by orders of magnitude."""
    from safetensors.torch import load_file
    import torch
    for processes in (1, 2):
        run_tool(['support.calibrate_in_processes', str(tmp_path / f'p{processes}')], processes)
    one = load_file(tmp_path / 'p1' / 'rank0.safetensors')
    ranks = [load_file(tmp_path / 'p2' / f'rank{r}.safetensors') for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one), 'every process holds the same weights'
    for k in one:
        torch.testing.assert_close(ranks[0][k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    reports = [json.loads((tmp_path / p / 'rank0.json').read_text()) for p in ('p1', 'p2')]
    assert (reports[0]['processes'], reports[1]['processes']) == (1, 2)
    for variant in ('gqa', 'kdgqa'):
        for a, b in zip(reports[0][variant]['error_calibrated'], reports[1][variant]['error_calibrated']):
            assert math.isclose(a, b, rel_tol=1e-4), (variant, a, b)
        assert reports[0][variant]['error_calibrated'] < reports[0][variant]['error_mean_pooled']


def test_convert_cli_two_processes_give_the_one_process_report(tmp_path, cifar_subset):
    """``python -m gqa_core.convert`` with the advisor, calibration and --eval: the top-1 hit counts are added up
    exactly; the layer errors follow the calibrated weights, equal to about 1e-6 (see the test above)."""
    args = [str(MODELS / 'mha'), '--kv-heads', '4', '--head-order', 'output-error', '--calibration',
            str(cifar_subset), '--images', '37', '--steps', '5', '--eval', str(cifar_subset), '--limit', IMAGES,
            '--held-out', '8']
    one, two = one_and_two(tmp_path, 'gqa_core.convert', args, '--json', 'convert.json')
    assert (one['processes'], two['processes']) == (1, 2)
    assert one['top1'] == two['top1'] and one['top1']['n'] == int(IMAGES)
    for key in ('error_mean_pooled', 'error_result'):
        for a, b in zip(one['held_out'][key], two['held_out'][key]):
            assert math.isclose(a, b, rel_tol=1e-4), (key, a, b)


def test_every_process_leaves_its_gloo_group_before_the_interpreter_ends(tmp_path):
    """A gloo process still in its group at interpreter finalisation can abort (SIGABRT, "terminate called without
    an active exception"), rarely, which failed a two-process run in CI: every accelerator the tools make leaves
    the group at exit."""
    run_tool(['support.leave_group', str(tmp_path)], 2)
    assert sorted(p.read_text() for p in tmp_path.glob('rank*.txt')) == ['left', 'left']
