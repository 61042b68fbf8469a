"""fp32 / bf16 / fp16 for every variant; torch.compile for the static ones."""
import pytest
import torch

from gqa_core import convert

from support import tiny_vit

VARIANTS = [('mha', None, {}), ('gqa', 3, {}), ('kdgqa', 3, {}), ('dgqa', 3, {'window': 1}), ('pgqa', 3, {}),
            ('kdgqa', 3, {'compat': 'official'}), ('dgqa', 3, {'compat': 'official'}),
            ('pgqa', 3, {'compat': 'official'})]


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('variant,G,options', VARIANTS)
def test_low_precision_forward_and_backward_are_finite_and_close(variant, G, options, dtype):
    model = convert(tiny_vit(), variant, G, **options)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = model.float()(x).detach()
    low = model.to(dtype)
    out = low(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    if options.get('compat') != 'official':  # official noise is random per call
        assert (out.float() - reference).abs().max() < 0.1
    low.train()
    low(x.to(dtype)).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters() if p.grad is not None)


@pytest.mark.parametrize('variant,G', [('gqa', 3), ('pgqa', 2)])
def test_static_policies_compile(variant, G):
    model = convert(tiny_vit(depth=1), variant, G)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max() <= 1e-5
