"""Every ``GQA_LENS_*`` variable is a field of :class:`Settings`, read only in ``core/settings.py``."""
import re
from dataclasses import fields
from pathlib import Path

import pytest

from gqa_core.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / 'app.py', *sorted((ROOT / 'gqa_core').rglob('*.py'))]


def test_every_variable_the_code_names_is_a_setting_and_only_settings_reads_the_environment():
    known = {Settings.variable(f.name) for f in fields(Settings)}
    named = set()
    for path in SOURCES:
        text = path.read_text()
        named |= set(re.findall(r'GQA_LENS_[A-Z0-9_]+', text))
        if path.name != 'settings.py':
            assert not re.search(r'environ(\.get)?\(?\[?[\'"]GQA_LENS_', text), f'{path.name} reads GQA_LENS_* itself'
    assert named - {'GQA_LENS_'} <= known, named - known
    assert len(known) == 16, sorted(known)


def test_values_parse_and_a_bad_one_names_its_variable(tmp_path):
    env = dict(GQA_LENS_MAX_PARAMS='1000', GQA_LENS_MODEL_DIRS=f'{tmp_path}:/x', GQA_LENS_TOKEN_REPOS=' a/* , b/c ,',
               GQA_LENS_TRITON='1', GQA_LENS_SESSION_TTL='90', GQA_LENS_CONCURRENCY='3', GQA_LENS_DEVICE='',
               GQA_LENS_CIFAR10='~/c.tar.gz', GQA_LENS_MCP='0')
    s = Settings.from_env(env)
    assert (s.max_params, s.model_dirs, s.token_repos, s.triton, s.session_ttl) == (
        1000, (str(tmp_path), '/x'), ('a/*', 'b/c'), True, 90.0)
    assert s.device is None, 'blank keeps the default'
    assert Settings().mcp and not s.mcp, 'the MCP server is on unless GQA_LENS_MCP=0'
    assert s.queue_limit == 96 and s.cifar10 == Path('~/c.tar.gz').expanduser()
    assert Settings.from_env({}) == Settings()
    for name, value in (('GQA_LENS_MAX_TOKENS', 'lots'), ('GQA_LENS_CONCURRENCY', '0'), ('GQA_LENS_TRITON', 'yes')):
        with pytest.raises(ValueError, match=f'^{name}='):
            Settings.from_env({name: value})
