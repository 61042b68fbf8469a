"""Whether the deep analyses (head ablation, faithfulness) run live: their arithmetic where they run, not the token
count alone (a ViT-L at 577 tokens is twelve times the work of DINOv2-S/14 at 1,374)."""
import dataclasses

import pytest
import spaces
import timm
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gqa_core import convert
from gqa_core.core.settings import Settings
from gqa_core.lens.analysis import analyse
from gqa_core.lens.deep_work import deep_forwards, deep_refusal, deep_tflop

from support import EXAMPLES_DIR


def dinov2(depth=None):
    extra = {} if depth is None else dict(depth=depth)
    return convert(timm.create_model('vit_small_patch14_reg4_dinov2', **extra), 'kdgqa', 3).eval()


def test_the_estimate_is_a_forwards_counted_arithmetic_times_the_forwards():
    model = dinov2(depth=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 518, 518))  # the math kernel's matmuls are counted (the fused CPU one is not)
    counts = counter.get_flop_counts()['Global']
    blocks = counter.get_total_flops() - sum(v for k, v in counts.items() if 'convolution' in str(k))
    assert deep_forwards(model) == pytest.approx(162.0)
    assert deep_tflop(model) == pytest.approx(deep_forwards(model) * blocks / 1e12, rel=0.01)


def test_dinov2_at_518_px_runs_on_the_cpu_by_default_and_a_vit_l_at_384_does_not():
    settings = Settings()
    small = dinov2()
    assert 20 < deep_tflop(small) < settings.deep_max_cpu_tflop and deep_refusal(small, settings) is None
    with torch.device('meta'):  # the count needs the geometry, not the weights
        large = convert(timm.create_model('vit_large_patch16_384'), 'kdgqa', 8)
    assert deep_tflop(large) > 200  # 577 tokens: under the old 600-token limit, half an hour on two cores
    refusal = deep_refusal(large, settings, device=torch.device('cpu'))
    assert refusal.startswith('head ablation and faithfulness of this model are about ') and \
        'GQA_LENS_DEEP_MAX_CPU_TFLOP' in refusal
    assert deep_refusal(large, settings, device=torch.device('cuda')) is None, 'a local GPU: the token limit only'
    assert 'tokens' in deep_refusal(small, dataclasses.replace(settings, deep_max_tokens=1000))


def test_on_zerogpu_the_limit_is_what_one_call_may_reserve(monkeypatch):
    monkeypatch.setattr(spaces.config.Config, 'zero_gpu', True)
    with torch.device('meta'):
        large = convert(timm.create_model('vit_large_patch14_reg4_dinov2'), 'kdgqa', 8)  # 1,374 tokens, 24 blocks
        base = convert(timm.create_model('vit_base_patch14_reg4_dinov2'), 'kdgqa', 6)
    assert 'ZeroGPU call' in deep_refusal(large, Settings())
    assert deep_refusal(base, Settings()) is None, 'a GPU runs what the CPU limit would refuse (105 TFLOP)'


def test_the_app_says_why_and_runs_nothing_deep_above_the_limit(monkeypatch):
    from gqa_core.lens.models import ModelRegistry
    loaded = ModelRegistry(device='cpu').get('embedded/kdgqa')  # the CPU's limit, whatever this machine has
    photo = Image.open(EXAMPLES_DIR / 'cifar10_dog.jpg')
    monkeypatch.setenv('GQA_LENS_DEEP_MAX_CPU_TFLOP', '0.001')
    refused = analyse(loaded, photo, deep=True)
    assert refused.ablation is None and refused.faithfulness is None
    assert 'GQA_LENS_DEEP_MAX_CPU_TFLOP' in refused.deep_note
    monkeypatch.delenv('GQA_LENS_DEEP_MAX_CPU_TFLOP')
    ran = analyse(loaded, photo, deep=True)
    assert ran.ablation is not None and ran.faithfulness and not ran.deep_note


def test_the_cpu_limit_is_a_runs_and_the_run_reports_the_deep_analyses_progress(monkeypatch):
    """Four columns of a run share one CPU limit (four models at the limit each would be four times its time),
    and the run's progress moves through each model's ablation and faithfulness."""
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.views import run_models
    registry = ModelRegistry(device='cpu')
    one = deep_tflop(registry.get('embedded/kdgqa').model)
    monkeypatch.setenv('GQA_LENS_DEEP_MAX_CPU_TFLOP', repr(one * 1.5))  # room for one embedded model, not two
    heard = []
    analyses, errors, _ = run_models(registry, str(EXAMPLES_DIR / 'cifar10_dog.jpg'),
                                     ['embedded/kdgqa', '(none)', 'embedded/gqa', '(none)'], deep=True,
                                     progress=lambda fraction, desc: heard.append((fraction, desc)))
    first, _, second, _ = analyses
    assert errors == [None] * 4 and first.ablation is not None and first.deep_tflop == pytest.approx(one)
    assert second.ablation is None and "after the" in second.deep_note and "this run's other models" in \
        second.deep_note and 'GQA_LENS_DEEP_MAX_CPU_TFLOP' in second.deep_note
    deep_steps = [(f, d) for f, d in heard if 'head ablation' in d or 'faithfulness' in d]
    assert deep_steps and all(0.25 <= f <= 0.5 for f, _ in deep_steps), 'the first of two models: 1/4 to 1/2'
    assert [f for f, _ in deep_steps] == sorted(f for f, _ in deep_steps)
