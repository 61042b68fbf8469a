"""timm coverage as bench/coverage.py counts it: at least 97 % of the pretrained tags of every timm module that
builds a transformer over patch tokens, and every refusal a ValueError that says why."""
import importlib.util
from pathlib import Path

import timm

BENCH = Path(__file__).resolve().parents[2] / 'bench' / 'coverage.py'


def _coverage():
    spec = importlib.util.spec_from_file_location('coverage_bench', BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_at_least_97_percent_of_timms_patch_transformer_tags_are_accepted_and_each_refusal_says_why():
    coverage = _coverage()
    tags = coverage.hub_tags(coverage.PATCH_TRANSFORMER_MODULES)
    modules = {timm.models.model_entrypoint(arch).__module__ for arch in tags}
    assert modules == set(coverage.PATCH_TRANSFORMER_MODULES), 'a counted module has no Hub tags'
    refused = {}
    for arch, names in tags.items():
        reason = coverage.accepts(arch)
        if reason:
            refused[arch] = (reason, len(names))
    total = sum(len(names) for names in tags.values())
    accepted = total - sum(n for _, n in refused.values())
    assert accepted / total >= 0.97, (accepted, total, refused)
    for arch, (reason, _) in refused.items():  # a ValueError (ConfigError is one) naming the reason, never a crash
        kind, _, words = reason.partition(': ')
        assert kind in ('ValueError', 'ConfigError') and len(words) > 30, (arch, reason)
