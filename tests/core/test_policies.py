"""Policy behaviour over time and in compat="official" mode (method.md's appendix)."""
import pytest
import torch

from gqa_core import convert, create_policy, start_epoch
from gqa_core.core.policies import DGQAPolicy, KDGQAPolicy, PGQAPolicy

from support import tiny_vit
from support.reference import hamilton


def norms_sequence(steps, G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(4, G, generator=gen) * 5 + 1 for _ in range(steps)]


@pytest.mark.parametrize('norms,H,expected', [
    ([10, 10.5, 11], 6, [0, 2, 4]),
    ([10, 10.2, 10.5, 11], 16, [0, 2, 5, 9]),
    ([10, 11], 12, [0, 12]),
])
def test_official_kdgqa_reproduces_examples(norms, H, expected):
    policy = KDGQAPolicy(H, len(norms), compat='official')
    # official sums the norms over the batch: split each norm over two samples
    batch = torch.tensor([norms, norms]) / 2
    assert policy(batch).allocation.tolist() == expected


def test_official_kdgqa_two_heads_is_always_mqa_on_larger_head():
    policy = KDGQAPolicy(12, 2, compat='official')
    for seed in range(20):
        norms = torch.rand(8, 2, generator=torch.Generator().manual_seed(seed)) + 0.1
        bigger = int(norms.sum(0).argmax())
        assert policy(norms).allocation.tolist() == [12 * (bigger == 0), 12 * (bigger == 1)]


def test_paper_kdgqa_is_per_sample_and_equal_norms_uniform():
    policy = KDGQAPolicy(6, 3)
    grouping = policy(torch.tensor([[10.0, 10.5, 11.0], [11.0, 10.0, 10.5], [2.0, 2.0, 2.0]]))
    assert grouping.allocation.tolist() == [[0, 2, 4], [4, 0, 2], [2, 2, 2]]
    assert grouping.query_to_kv.tolist()[0] == [1, 1, 2, 2, 2, 2]


def paper_dgqa_reference(sequence, H, stat, window, beta):
    """The paper's DGQA written as plain Python over a sequence of (B, G) norm batches."""
    G = sequence[0].shape[1]
    alloc, history, ema, ref = [H // G] * G, [(0, [H // G] * G)], None, None
    for step, batch in enumerate(sequence):
        n = batch.mean(0).tolist()
        if stat == 'ema':
            ema = n if ema is None else [beta * e + (1 - beta) * x for e, x in zip(ema, n)]
        if step % window == 0:
            if stat == 'ema':
                alloc = hamilton([e / sum(ema) for e in ema], H)
                history.append((step, alloc))
            else:
                if ref is not None:
                    delta = [abs(a - b) for a, b in zip(n, ref)]
                    alloc = hamilton([x / sum(delta) for x in delta], H)
                    history.append((step, alloc))
                ref = n
    return alloc, history


@pytest.mark.parametrize('stat', ['ema', 'diff'])
def test_paper_dgqa_windows_match_reference_and_freeze_in_eval(stat):
    H, G, window = 12, 4, 3
    sequence = norms_sequence(10, G)
    policy = DGQAPolicy(H, G, stat=stat, window=window, beta=0.8).train()
    for batch in sequence:
        policy(batch)
    alloc, history = paper_dgqa_reference(sequence, H, stat, window, 0.8)
    assert policy.allocation.tolist() == alloc
    assert policy.history.tolist() == [a for _, a in history]
    assert policy.history_steps.tolist() == [s for s, _ in history]
    assert int(policy.step) == 10
    policy.eval()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    for batch in norms_sequence(3, G, seed=1):
        assert policy(batch).allocation.tolist() == alloc
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items()), 'eval must not mutate state'


def test_dgqa_state_dict_round_trip_restores_allocation_history_and_step():
    policy = DGQAPolicy(6, 3, stat='ema', window=2).train()
    for batch in norms_sequence(7, 3):
        policy(batch)
    fresh = DGQAPolicy(6, 3, stat='ema', window=2)
    fresh.load_state_dict(policy.state_dict())
    for name in ('allocation', 'history', 'history_steps', 'step', 'ema'):
        assert torch.equal(getattr(fresh, name), getattr(policy, name)), name
    fresh.train()
    policy.train()
    nxt = norms_sequence(1, 3, seed=5)[0]
    assert fresh(nxt).allocation.tolist() == policy(nxt).allocation.tolist()
    assert fresh._step == policy._step == 8


def test_official_dgqa_cache_update_and_eval_recompute():
    H, G, W = 6, 3, 2
    policy = DGQAPolicy(H, G, stat='ema', window=W, compat='official').train()
    c = torch.zeros(G)
    for step, batch in enumerate(norms_sequence(5, G)):
        m = batch.sum(0)
        policy(batch)
        if step % W == 0:
            e = 0.9 * m + 0.1 * c
            c = (c + m) / W
            rounded = torch.round(e / e.sum() * H)
            assert (policy.allocation - rounded).abs().sum() <= G // 2 + 1  # random repair moves at most a few
        assert torch.allclose(policy.reference, c)
        assert int(policy.allocation.sum()) == H
    start_epoch(torch.nn.Sequential(policy))
    assert policy._step == 0 and int(policy.step) == 0
    policy.eval()
    batch = norms_sequence(1, G, seed=3)[0]
    changes = len(policy.history)
    policy(batch)
    assert torch.allclose(policy.reference, batch.sum(0)), 'official eval sets c <- m'
    assert len(policy.history) == changes, 'eval recomputation is not training history'


def test_official_dgqa_diff_same_batch_twice_does_not_hang_or_nan():
    policy = DGQAPolicy(6, 3, stat='diff', window=1, compat='official').eval()
    batch = norms_sequence(1, 3)[0]
    policy(batch)
    grouping = policy(batch)  # delta = 0: the authors' code divides 0 by 0 here and then loops ~2^31 times
    assert grouping.allocation.tolist() == [2, 2, 2]
    assert torch.isfinite(grouping.shares).all()


def test_official_random_repair_uses_own_generator_not_global_rng():
    def run():
        policy = DGQAPolicy(16, 8, stat='ema', window=1, compat='official', seed=3).train()
        out = [policy(b).allocation.clone() for b in norms_sequence(6, 8)]
        return torch.stack(out)
    torch.manual_seed(0)
    a = run()
    torch.manual_seed(123)
    b = run()
    assert torch.equal(a, b)
    assert (a.sum(-1) == 16).all()


def test_official_pgqa_noise_on_outputs_train_and_eval_and_bf16():
    model = convert(tiny_vit(), 'pgqa', 3, compat='official')
    x = torch.randn(2, 3, 32, 32)
    plain = convert(tiny_vit(), 'gqa', 3)
    with torch.no_grad():
        noisy, clean = model(x), plain(x)
        assert (noisy - clean).abs().max() > 1e-3
        assert torch.isfinite(model.to(torch.bfloat16)(x.to(torch.bfloat16))).all()


def test_pgqa_paper_noise_only_in_training():
    model = convert(tiny_vit(), 'pgqa', 3, noise_scale=0.5)
    plain = convert(tiny_vit(), 'gqa', 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        model.train(), plain.train()
        assert (model(x) - plain(x)).abs().max() > 1e-3


@pytest.mark.parametrize('variant,G,options,message', [
    ('nope', 3, {}, 'unknown variant'),
    ('gqa', 4, {}, 'divisor'),
    ('gqa', None, {}, 'num_kv_heads is required'),
    ('mha', 3, {}, 'must equal num_heads'),
    ('dgqa', 3, {'stat': 'median'}, 'stat'),
    ('dgqa', 3, {'window': 0}, 'window'),
    ('pgqa', 3, {'noise_scale': -1.0}, 'noise_scale'),
    ('gqa', 3, {'colour': 'red'}, 'bad policy options'),
    ('gqa', 3, {'compat': 'fast'}, 'compat'),
])
def test_bad_policy_arguments_name_the_problem(variant, G, options, message):
    with pytest.raises(ValueError, match=message):
        create_policy(variant, 6, G, **options)


def test_pgqa_training_noise_from_own_generator():
    policy = PGQAPolicy(6, 3, noise_scale=1.0, seed=1).train()
    attn = torch.rand(2, 6, 5, 5).softmax(-1)
    torch.manual_seed(0)
    a = policy.perturb_attention_map(attn)
    fresh = PGQAPolicy(6, 3, noise_scale=1.0, seed=1).train()
    torch.manual_seed(99)
    assert torch.equal(a, fresh.perturb_attention_map(attn))
    assert not torch.equal(a, policy.perturb_attention_map(attn)), 'the stream advances'
