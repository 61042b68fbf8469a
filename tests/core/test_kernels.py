"""The Triton routed-attention kernel, run in Triton's CPU interpreter (no GPU here)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip('triton')

SCRIPT = textwrap.dedent('''
    import json, torch, torch.nn.functional as F
    from gqa_core import convert
    from gqa_core.core.attention import route_kv
    from gqa_core.core.kernels import routed_attention, triton_enabled
    from support import tiny_vit
    torch.manual_seed(0)
    out = {"enabled": triton_enabled(torch.zeros(1))}
    errors = []
    for B, H, G, T, d in [(2, 6, 3, 17, 8), (1, 8, 4, 65, 16), (2, 12, 4, 50, 24), (1, 6, 2, 70, 64)]:
        q, k, v = torch.randn(B, H, T, d), torch.randn(B, G, T, d), torch.randn(B, G, T, d)
        table = torch.randint(0, G, (B, H))
        table[0] = 0  # every query on one KV head: the others serve none
        for routing in (table, table[0]):
            got = routed_attention(q, k, v, routing, d ** -0.5, block_m=32, block_n=32)
            ref = F.scaled_dot_product_attention(q, route_kv(k, routing), route_kv(v, routing))
            errors.append(float((got - ref).abs().max()))
    out["kernel_max_err"] = max(errors)
    import gqa_core.core.attention as attention
    calls = []
    original = attention.routed_attention
    attention.routed_attention = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    model = convert(tiny_vit(depth=2), "kdgqa", 3).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        from gqa_core.core.kernels import use_triton
        use_triton(False)
        slow = model(x)
    out["model_max_err"] = float((fast - slow).abs().max())
    out["kernel_calls"] = len(calls)
    print("RESULT" + json.dumps(out))
''')


def test_routed_kernel_matches_sdpa_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1', GQA_LENS_TRITON='1')
    proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(__file__)))  # tests/: support
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('RESULT', 1)[1])
    assert result['enabled']
    assert result['kernel_max_err'] <= 1e-5
    assert result['kernel_calls'] == 2, 'one routed call per layer of the 2-layer model, then the fallback'
    assert result['model_max_err'] <= 1e-5
