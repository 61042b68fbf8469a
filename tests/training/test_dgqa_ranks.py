"""Two-process DGQA training: both processes make the same allocation decisions, step after step.

Each process writes what its own policies held after every training forward (tests/support/train_dgqa_ranks.py);
the trainer's DDP does not broadcast rank 0's buffers, so what is compared is what each process computed.
"""
import json

from support.launch import run_tool


def test_dgqa_allocations_and_histories_are_identical_on_both_processes(tmp_path, cifar_subset):
    run_tool(['support.train_dgqa_ranks', str(cifar_subset), str(tmp_path)], processes=2)
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for mine, theirs in zip(*ranks):
        assert mine == theirs, f'the processes disagree after step {mine["step"]} of policy {mine["policy"]}'
    last = {record['policy']: record for record in ranks[0]}
    assert sorted(last) == [0, 1, 2, 3], 'two layers of DGQA-diff and two of DGQA-EMA trained'
    for policy, record in last.items():
        assert len(record['history']) >= 8, 'a re-allocation every step (window 1), each in the history'
        if policy < 2:  # DGQA-diff moves heads; EMA's allocation may stay uniform while its shares move
            assert len({tuple(a) for a in record['history']}) >= 4
    assert len({tuple(r['shares']) for r in ranks[0] if r['policy'] >= 2}) >= 8, 'the EMA statistic moved'
