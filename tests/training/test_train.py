"""CPU smoke tests of the training and evaluation CLIs on real CIFAR-10 images."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gqa_core import grouping_config
from gqa_core.training.evaluate import evaluate
from gqa_core.io.hub import from_pretrained
from gqa_core.training.train import parse_args, run

TINY_ARGS = ('--timm-model vit_tiny_patch16_224 --model-args '
             '{"img_size":32,"patch_size":8,"embed_dim":48,"depth":2,"num_heads":6,"mlp_ratio":2.0,"num_classes":10}')
PRE = '{"input_size":[3,32,32],"mean":[0.5,0.5,0.5],"std":[0.5,0.5,0.5],"interpolation":"bicubic","crop_pct":1.0}'


def config(data, out, *extra):
    argv = (f'--data {data} --out {out} {TINY_ARGS} --batch-size 50 --lr 0.003 --weight-decay 0.0 '
            f'--augment none --workers 0 --seed 0').split() + ['--preprocessing', PRE] + list(extra)
    return parse_args(argv)


def test_train_resume_and_loss_goes_down(cifar_subset, tmp_path):
    straight = config(cifar_subset, tmp_path / 'straight', '--variants', 'gqa', '--epochs', '3')
    run(straight)
    interrupted = config(cifar_subset, tmp_path / 'resumed', '--variants', 'gqa', '--epochs', '3',
                         '--stop-after', '2')
    run(interrupted)
    resumed = config(cifar_subset, tmp_path / 'resumed', '--variants', 'gqa', '--epochs', '3', '--resume')
    run(resumed)
    history = json.loads((tmp_path / 'resumed' / 'gqa' / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == [1, 2, 3]
    assert history[-1]['train_loss'] < history[0]['train_loss']
    a = load_file(tmp_path / 'straight' / 'gqa' / 'checkpoint' / 'model.safetensors')
    b = load_file(tmp_path / 'resumed' / 'gqa' / 'checkpoint' / 'model.safetensors')
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), 'resuming continues the same run'
    checkpoint = tmp_path / 'resumed' / 'gqa' / 'checkpoint'
    assert sorted(p.name for p in checkpoint.iterdir()) == ['model.safetensors', 'state.json',
                                                            'training_state.json', 'training_state.safetensors']
    summary = json.loads((tmp_path / 'resumed' / 'comparison.json').read_text())[0]
    saved = tmp_path / 'resumed' / 'gqa' / 'model'
    model = from_pretrained(str(saved))
    assert summary['variant'] == 'gqa' and summary['params'] == sum(p.numel() for p in model.parameters())
    assert summary['steps'] == history[-1]['step']
    again = evaluate(str(saved), str(cifar_subset), 'test')
    assert abs(summary['test_top1'] - again['top1']) * again['n'] <= 1, 'the summary is the saved model\'s test top-1'


def test_mixup_cutmix_train_and_resume_exactly(cifar_subset, tmp_path):
    """timm's Mixup / CutMix (--mixup, --cutmix) mix every batch; its numpy draws are part of the checkpoint, so an
    interrupted run resumes to the same weights as a straight one."""
    mix = ('--variants', 'kdgqa', '--epochs', '2', '--mixup', '0.8', '--cutmix', '1.0', '--label-smoothing', '0.1')
    run(config(cifar_subset, tmp_path / 'straight', *mix))
    run(config(cifar_subset, tmp_path / 'resumed', *mix, '--stop-after', '1'))
    import numpy as np
    np.random.seed(123)  # whatever happened in between, the checkpoint restores the draws
    run(config(cifar_subset, tmp_path / 'resumed', *mix, '--resume'))
    a = load_file(tmp_path / 'straight' / 'kdgqa' / 'checkpoint' / 'model.safetensors')
    b = load_file(tmp_path / 'resumed' / 'kdgqa' / 'checkpoint' / 'model.safetensors')
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), 'the resumed run mixed the same batches'
    plain = load_file(tmp_path / 'straight' / 'kdgqa' / 'checkpoint' / 'model.safetensors')
    history = json.loads((tmp_path / 'straight' / 'kdgqa' / 'metrics.json').read_text())
    assert all(math.isfinite(h['train_loss']) for h in history) and history[-1]['train_loss'] > 0
    run(config(cifar_subset, tmp_path / 'unmixed', '--variants', 'kdgqa', '--epochs', '2', '--label-smoothing', '0.1'))
    other = load_file(tmp_path / 'unmixed' / 'kdgqa' / 'checkpoint' / 'model.safetensors')
    assert any(not torch.equal(plain[k], other[k]) for k in plain), 'mixing changes what is learned'


def test_a_finished_variant_is_pruned_and_skipped_when_resumed(cifar_subset, tmp_path):
    """--no-keep-checkpoints leaves a finished variant its model, metrics and summary only (what a committed
    multi-sitting run carries); --resume then returns that summary instead of training or testing again."""
    first = run(config(cifar_subset, tmp_path, '--variants', 'gqa', '--epochs', '1', '--no-keep-checkpoints'))
    folder = tmp_path / 'gqa'
    assert sorted(p.name for p in folder.iterdir()) == ['metrics.csv', 'metrics.json', 'model', 'summary.json']
    assert first[0]['complete'] and first[0]['epochs'] == 1
    more = run(config(cifar_subset, tmp_path, '--variants', 'gqa', 'mha', '--epochs', '1', '--resume',
                      '--no-keep-checkpoints'))
    assert more[0] == first[0] and more[1]['variant'] == 'mha' and more[1]['complete']
    assert len(json.loads((folder / 'metrics.json').read_text())) == 1, 'the finished variant was not trained again'
    again = run(config(tmp_path / 'no-data-needed', tmp_path, '--variants', 'gqa', 'mha', '--epochs', '1', '--resume'))
    assert again == more, 'everything finished: the stored summaries; no data read, nothing built or trained'
    assert json.loads((tmp_path / 'comparison.json').read_text()) == more


def test_variants_comparison_and_dgqa_history_saved(cifar_subset, tmp_path):
    cfg = config(cifar_subset, tmp_path, '--variants', 'mha', 'dgqa-ema', '--epochs', '1', '--window', '2',
                 '--save-dtype', 'float16')
    rows = run(cfg)
    assert [r['variant'] for r in rows] == ['mha', 'dgqa-ema']
    table = (tmp_path / 'comparison.md').read_text()
    assert '| dgqa-ema |' in table and 'KV cache' in table
    assert rows[1]['kv_cache_bytes'] * 2 == rows[0]['kv_cache_bytes']
    model = from_pretrained(str(tmp_path / 'dgqa-ema' / 'model'))
    assert grouping_config(model)['window'] == 2
    policy = model.blocks[0].attn.policy
    assert len(policy.history) == len(policy.history_steps) > 2, 'history over training travels with the model'
    result = evaluate(str(tmp_path / 'dgqa-ema' / 'model'), str(cifar_subset), 'test')
    assert result['n'] == 200 and len(result['per_class']) == 10
    assert len(result['mean_allocation']) == 2 and all(abs(sum(r) - 6) < 1e-6 for r in result['mean_allocation'])
    card = (tmp_path / 'dgqa-ema' / 'model' / 'README.md').read_text()
    assert 'test_top1' in card


def test_bad_train_arguments_fail_clearly(cifar_subset, tmp_path):
    with pytest.raises(SystemExit, match='--data is required'):
        parse_args(['--variants', 'gqa'])
    with pytest.raises(SystemExit):
        parse_args(['--data', 'x', '--variants', 'sparkle'])
    cfg = config(cifar_subset, tmp_path, '--init-from', str(tmp_path / 'nowhere'))
    with pytest.raises(ValueError, match='nowhere'):
        run(cfg)


def test_two_process_data_parallel_training(cifar_subset, tmp_path):
    """The same script under torchrun with 2 CPU processes (gloo): the data is sharded, DGQA decides
    identically on both ranks (its statistics are all-reduced), rank 0 saves."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'gqa_core.train',
           '--data', str(cifar_subset), '--out', str(tmp_path), *TINY_ARGS.split()[:2], '--model-args',
           TINY_ARGS.split(' ', 3)[3], '--preprocessing', PRE, '--variants', 'dgqa-ema', '--window', '2',
           '--epochs', '1', '--batch-size', '20', '--workers', '0', '--augment', 'none']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / 'dgqa-ema' / 'metrics.json').read_text())
    assert history[0]['step'] == 540 // 20 // 2, 'each process sees half of the 540 training images'
    model = from_pretrained(str(tmp_path / 'dgqa-ema' / 'model'))
    assert len(model.blocks[0].attn.policy.history) > 2


def test_authors_preset_normalises_with_half_whatever_the_start(tmp_path):
    """--preset authors means mean = std = 0.5 (method.md), for a start from a saved MHA model as well as from
    a timm name; flags still override it."""
    from gqa_core.lens.models import EMBEDDED_DIR
    from gqa_core.training.train import build_start_model
    from_timm = TINY_ARGS.split(' ', 3)[:2] + ['--model-args', TINY_ARGS.split(' ', 3)[3]]
    for start in (['--init-from', str(EMBEDDED_DIR / 'mha')], from_timm):
        cfg = parse_args(['--preset', 'authors', '--data', str(tmp_path), *start])
        _, preprocessing, _ = build_start_model(cfg)
        assert preprocessing['mean'] == [0.5] * 3 and preprocessing['std'] == [0.5] * 3, start
    cfg = parse_args(['--preset', 'authors', '--data', str(tmp_path), '--init-from', str(EMBEDDED_DIR / 'mha'),
                      '--preprocessing', PRE.replace('0.5,0.5,0.5],"std"', '0.4,0.4,0.4],"std"'), '--mean-std', '0.25'])
    _, preprocessing, _ = build_start_model(cfg)
    assert preprocessing['mean'] == [0.25] * 3


def test_batched_crop_flip_is_torchvisions_crop_and_flip():
    """The predecoded path's batched augmentation gives, for every image, torchvision's reflect-padded crop at
    the same corner, flipped when asked -- pixel for pixel."""
    from torchvision.transforms import functional as TF
    from gqa_core.training.data import crop_flip
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0], [0, 8], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(images, offsets, flips, padding=4)
    for i in range(6):
        padded = TF.pad(images[i], [4, 4, 4, 4], padding_mode='reflect')
        expected = TF.crop(padded, int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        if flips[i]:
            expected = TF.hflip(expected)
        assert torch.equal(out[i], expected), f'image {i}'


def test_predecoded_split_matches_the_per_image_pipeline(cifar_subset):
    """Decoded once, without augmentation, the training split yields the tensors the per-image pipeline
    yields; with crop-flip it draws new crops every epoch."""
    from gqa_core.training.data import DecodedImages, build_datasets
    pre = json.loads(PRE)
    per_image = build_datasets(str(cifar_subset), pre, augment='none')
    decoded = build_datasets(str(cifar_subset), pre, augment='none', predecode=True)
    assert isinstance(decoded.train, DecodedImages) and len(decoded.train) == len(per_image.train)
    images, labels = decoded.train.collate([decoded.train[i] for i in range(8)])
    expected = torch.stack([per_image.train[i][0] for i in range(8)])
    assert torch.equal(labels, torch.tensor([per_image.train[i][1] for i in range(8)]))
    assert torch.allclose(images, expected, atol=1e-6)
    augmented = build_datasets(str(cifar_subset), pre, augment='crop-flip', predecode=True).train
    batch = [augmented[i] for i in range(8)]
    first, second = augmented.collate(batch)[0], augmented.collate(batch)[0]
    assert first.shape == expected.shape and not torch.equal(first, second)


def test_seeds_run_once_per_seed_and_summarise(cifar_subset, tmp_path):
    """--seeds: every variant once per seed in out/seed{S}, the split fixed, mean ± std written; the seeds CLI
    judges each variant against GQA."""
    import statistics
    from gqa_core.training import seeds
    cfg = config(cifar_subset, tmp_path / 'run', '--variants', 'gqa', 'kdgqa', '--epochs', '1', '--seeds', '0', '1')
    rows = run(cfg)
    assert sorted((r['variant'], r['seed']) for r in rows) == [('gqa', 0), ('gqa', 1), ('kdgqa', 0), ('kdgqa', 1)]
    a = load_file(tmp_path / 'run' / 'seed0' / 'gqa' / 'checkpoint' / 'model.safetensors')
    b = load_file(tmp_path / 'run' / 'seed1' / 'gqa' / 'checkpoint' / 'model.safetensors')
    assert any(not torch.equal(a[k], b[k]) for k in a), 'another seed trains differently'
    data = json.loads((tmp_path / 'run' / seeds.SEEDS_FILE).read_text())
    kd = next(s for s in data['summary'] if s['variant'] == 'kdgqa')
    tests = [r['test_top1'] for r in rows if r['variant'] == 'kdgqa']
    assert kd['n'] == 2 and kd['test_top1_mean'] == pytest.approx(statistics.fmean(tests))
    assert kd['test_top1_std'] == pytest.approx(statistics.stdev(tests))
    seeds.main([str(tmp_path / 'run'), '--reference', 'gqa', '--out', str(tmp_path / 'summary')])
    verdicts = json.loads((tmp_path / 'summary' / 'seeds.json').read_text())['verdicts']
    assert [v['variant'] for v in verdicts] == ['kdgqa'] and verdicts[0]['reference'] == 'gqa'
    gqa = next(s for s in data['summary'] if s['variant'] == 'gqa')
    assert verdicts[0]['difference'] == pytest.approx(kd['test_top1_mean'] - gqa['test_top1_mean'])


def test_beyond_noise_is_welchs_t_test_on_the_seeds():
    """p < 0.05 by Welch's two-sided t-test: 2.45 standard errors apart is not enough with three seeds a side
    (it was under a plain two-standard-error rule); identical runs are within noise."""
    from gqa_core.training.seeds import summarise, verdict

    def runs(variant, values):
        return summarise([dict(variant=variant, seed=i, val_top1=v, test_top1=v) for i, v in enumerate(values)])[0]
    apart = verdict(runs('kdgqa', [0.70, 0.71, 0.72]), runs('gqa', [0.60, 0.61, 0.62]))
    assert apart['beyond_noise'] and 'better' in apart['says'] and apart['p_value'] < 1e-3
    close = verdict(runs('kdgqa', [0.70, 0.75, 0.65]), runs('gqa', [0.69, 0.74, 0.64]))
    assert not close['beyond_noise'] and 'within noise' in close['says']
    assert close['standard_error'] == pytest.approx(((0.05 ** 2 / 3) * 2) ** 0.5)
    nearly = verdict(runs('kdgqa', [0.70, 0.72, 0.74]), runs('gqa', [0.66, 0.68, 0.70]))
    assert nearly['difference'] / nearly['standard_error'] == pytest.approx(2.449, abs=1e-3)
    assert not nearly['beyond_noise'] and 0.05 < nearly['p_value'] < 0.1, nearly
    worse = verdict(runs('kdgqa', [0.50, 0.51, 0.52]), runs('gqa', [0.60, 0.61, 0.62]))
    assert worse['beyond_noise'] and 'worse' in worse['says']
    for same in ([0.7, 0.71, 0.72], [0.7, 0.7, 0.7]):
        tie = verdict(runs('dgqa-ema', same), runs('gqa', same))
        assert tie['p_value'] == 1.0 and not tie['beyond_noise'], tie
