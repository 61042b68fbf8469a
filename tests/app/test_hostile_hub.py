"""Hostile Hub repos against the running app: the corpus of :mod:`support.hostile_repos` served by a real local
Hub over HTTP to the real app in its own process (HF_TOKEN set, as an operator's would be).

For every repo, over /run and /predict: one line naming the problem (no raw Python message, no server path, not
gradio's generic error), the next request is served normally, no weights file is fetched for a config refused
on its own, no pickle is ever fetched (so none is unpickled: the corpus's pickles would leave a folder behind),
and no request carries the operator's token.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from support import EXAMPLES_DIR, ROOT, free_port, serve_app
from support.hostile_repos import MAX_PARAMS, MAX_TOKENS, ORG, PICKLES, WEIGHTS, HostileRepo, corpus, write_corpus
from support.hub_server import HubServer

OPERATOR_TOKEN = 'hf_operator_secret_token'
IMAGE = EXAMPLES_DIR / 'cifar10_cat.jpg'
GENERIC = 'The upstream Gradio app has raised an exception'
# What a Python exception's own text looks like when it reaches a visitor unexplained.
RAW_PYTHON = ('Traceback', 'not supported between instances', 'unhashable type', 'object has no attribute',
              'NoneType', 'maximum recursion', 'Exceeds the limit', 'Error(s) in loading', 'torch.Size',
              'AssertionError', 'KeyError', 'IndexError')
# The folder the corpus's pickles create if anything unpickles them (it must never exist).
SENTINEL = Path(tempfile.mkdtemp(prefix='gqa-lens-hostile-')) / 'unpickled'
REPOS = corpus(SENTINEL)


@dataclass
class HostileHub:
    """The running app, its Hub, a client of each, and what a normal request answers."""
    url: str
    hub: HubServer
    client: Client
    sentinel: Path
    baseline: Dict[str, float]
    tmp: Path


@pytest.fixture(scope='module')
def hostile_hub(tmp_path_factory) -> HostileHub:
    tmp = tmp_path_factory.mktemp('hostile-hub')
    write_corpus(tmp / 'hub', REPOS)
    with HubServer(tmp / 'hub') as hub:
        port = free_port()
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=OPERATOR_TOKEN, HF_HUB_OFFLINE='0',
                   HF_HOME=str(tmp / 'hf-home'), HF_HUB_DISABLE_XET='1', GQA_LENS_MAX_PARAMS=str(MAX_PARAMS),
                   GQA_LENS_MAX_TOKENS=str(MAX_TOKENS))
        env.pop('GQA_LENS_TOKEN_REPOS', None)
        with open(tmp / 'app.log', 'w') as log:
            proc = serve_app(port, env, log)
            try:
                url = f'http://127.0.0.1:{port}'
                client = Client(url, verbose=False)
                baseline = client.predict(handle_file(str(IMAGE)), 'embedded/mha', api_name='/predict')
                yield HostileHub(url, hub, client, SENTINEL, baseline, tmp)
            finally:
                proc.kill()
                proc.wait()


def server_paths(tmp: Path) -> List[str]:
    return [str(ROOT), str(tmp), os.path.expanduser('~'), '/tmp', '/work', '/root', 'site-packages']


def assert_one_clear_line(text: str, repo: HostileRepo, tmp: Path) -> None:
    assert repo.expected in text, (repo.name, text)
    assert '\n' not in text and len(text) < 600, (repo.name, text)
    assert GENERIC not in text
    for raw in RAW_PYTHON:
        assert raw not in text, (repo.name, raw, text)
    for path in server_paths(tmp):
        assert path not in text, (repo.name, path, text)


def run_status(client: Client, spec: str) -> str:
    """The /run status line for ``spec`` alone in the first slot."""
    return client.predict(handle_file(str(IMAGE)), spec, '', '', '', 'attention', 0, 'mean', 'mean', 'zero', False,
                          api_name='/run')[0]


def predict_error(client: Client, spec: str) -> str:
    """The message /predict refuses ``spec`` with."""
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(str(IMAGE)), spec, api_name='/predict')
    return str(refused.value)


def requests_for(hub: HubServer, start: int, repo: HostileRepo) -> List[Tuple[str, Any]]:
    return [(path, auth) for path, auth in hub.requests[start:] if f'/{ORG}/{repo.name}/' in path]


def test_the_corpus_is_large_and_its_names_unique():
    assert len(REPOS) >= 30
    assert len({r.name for r in REPOS}) == len(REPOS)


@pytest.mark.parametrize('repo', REPOS, ids=[r.name for r in REPOS])
def test_each_hostile_repo_gets_one_line_and_the_app_keeps_serving(hostile_hub, repo):
    h = hostile_hub
    start = len(h.hub.requests)
    status = run_status(h.client, repo.spec)
    if repo.expected is None:
        assert status == 'done', status
        assert h.client.predict(handle_file(str(IMAGE)), repo.spec, api_name='/predict')
    else:
        assert status.startswith('⚠️'), status
        assert_one_clear_line(status, repo, h.tmp)
        assert_one_clear_line(predict_error(h.client, repo.spec), repo, h.tmp)
    assert h.client.predict(handle_file(str(IMAGE)), 'embedded/mha', api_name='/predict') == h.baseline
    seen = requests_for(h.hub, start, repo)
    assert seen, 'the app asked the Hub'
    assert all(auth is None for _, auth in seen), f'a visitor request carried a token: {seen}'
    assert not any(path.endswith(PICKLES) for path, _ in seen), f'a pickle was fetched: {seen}'
    if repo.config_refused:
        assert not any(path.endswith((WEIGHTS, *PICKLES)) for path, _ in seen), f'weights fetched: {seen}'
    assert not h.sentinel.exists(), 'a pickle was unpickled'
