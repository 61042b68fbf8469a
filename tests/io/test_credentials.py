"""Visitors never borrow the operator's Hub token: the real app in its own process, HF_TOKEN set, against a
local HTTP Hub that serves private repos only to that token and records what every request carried."""
import os

import pytest
from gradio_client import Client, handle_file

from support import EXAMPLES_DIR, ROOT, free_port, serve_app
from gqa_core.io.credentials import token_repos, visitor_token
from support.answers import columns
from support.hub_server import HubServer

OWNER_TOKEN = 'hf_owner_secret_token'


def test_operator_patterns():
    allowed = token_repos(' myorg/* , me/one-model,')
    assert allowed == ('myorg/*', 'me/one-model')
    assert visitor_token('myorg/anything', allowed) is None and visitor_token('me/one-model@v2', allowed) is None
    assert visitor_token('me/other', allowed) is False and visitor_token('myorgx/a', allowed) is False
    assert visitor_token('myorg/a', ()) is False


@pytest.fixture(scope='module')
def private_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp('hub')
    for org in ('owner', 'trusted'):
        repo = root / org / 'private-model'
        repo.mkdir(parents=True)
        for name in ('config.json', 'model.safetensors'):
            (repo / name).write_bytes((ROOT / 'assets' / 'models' / 'gqa' / name).read_bytes())
    with HubServer(root, private=('owner', 'trusted'), token=OWNER_TOKEN) as hub:
        port = free_port()
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=OWNER_TOKEN, HF_HUB_OFFLINE='0',
                   HF_HOME=str(tmp_path_factory.mktemp('hf-home')), HF_HUB_DISABLE_XET='1',
                   GQA_LENS_TOKEN_REPOS='trusted/*')
        proc = serve_app(port, env, open(tmp_path_factory.mktemp('log') / 'app.log', 'w'))
        try:
            yield f'http://127.0.0.1:{port}', hub
        finally:
            proc.kill()
            proc.wait()


def run_spec(url, spec):
    return Client(url, verbose=False).predict(handle_file(str(EXAMPLES_DIR / 'cifar10_cat.jpg')), spec, '', '', '',
                                              'attention', 0, 'mean', 'mean', 'zero', False, api_name='/run')


def test_a_visitor_spec_for_the_owners_private_repo_carries_no_token(private_hub):
    url, hub = private_hub
    for spec in ('hub:owner/private-model', 'convert:hub:owner/private-model:gqa:2'):
        hub.requests.clear()
        status = run_spec(url, spec)[0]
        assert 'owner/private-model: not found or private' in status, status
        seen = [auth for path, auth in hub.requests if 'owner/private-model' in path]
        assert seen, 'the app asked the Hub'
        assert all(auth is None for auth in seen), f'a visitor request carried a token: {seen}'


def test_a_repo_the_operator_allowed_loads_with_the_token(private_hub):
    url, hub = private_hub
    hub.requests.clear()
    out = run_spec(url, 'hub:trusted/private-model')
    assert out[0] == 'done' and 'hub:trusted/private-model' in columns(out)[0]['summary'], out[0]
    seen = {auth for path, auth in hub.requests if 'trusted/private-model' in path}
    assert seen == {f'Bearer {OWNER_TOKEN}'}, seen
