"""The MCP server through a real MCP client (the ``mcp`` package's streamable-HTTP client) against the app
launched as ``main()`` launches it (:meth:`LensApp.launch`): exactly the four tools, each documented and typed,
each answering what the same code computes in this process, hostile input refused with the web page's own one
line, and no MCP endpoint at all with ``GQA_LENS_MCP=0``."""
import asyncio
import base64
import json
import math
import os
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

import app
from support import ALLOWED_MODELS, EXAMPLES_DIR, ROOT, free_port
from gqa_core.core.head_order import head_groups
from gqa_core.core.settings import Settings
from gqa_core.lens.analysis import analyse
from gqa_core.lens.explorer import live_kv_budget
from gqa_core.lens.images import load_image
from gqa_core.lens.tools import TOOL_NAMES, analysis_json

SHIP = EXAMPLES_DIR / 'cifar10_ship.jpg'
TOLERANCE = 2e-5  # another process may sum in another order; the JSON rounds to 1e-5


def launched(settings: Settings) -> tuple:
    """``(url, lens)``: an app for ``settings`` serving on a free port, launched the way ``main()`` does."""
    lens = app.create_app(settings)
    port = free_port()
    lens.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
    return f'http://127.0.0.1:{port}', lens


@pytest.fixture(scope='module')
def served():
    """The app with the environment's settings: GQA_LENS_MCP is unset, so the MCP server is on."""
    assert 'GQA_LENS_MCP' not in os.environ
    url, lens = launched(Settings.from_env())
    try:
        yield url
    finally:
        lens.demo.close()


def in_a_session(url: str, work):
    """``await work(session)`` in one initialised MCP session with the app at ``url``."""
    async def run():
        async with streamable_http_client(f'{url}/gradio_api/mcp/') as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)
    return asyncio.run(run())


def call(url: str, tool: str, **arguments):
    return in_a_session(url, lambda session: session.call_tool(tool, arguments))


def answer(url: str, tool: str, **arguments):
    """A tool's JSON answer, parsed (the call must succeed and give one text)."""
    result = call(url, tool, **arguments)
    assert not result.isError and len(result.content) == 1, result.content
    return json.loads(result.content[0].text)


def refusal(url: str, tool: str, **arguments) -> str:
    """A tool's refusal: one line, naming no server path."""
    result = call(url, tool, **arguments)
    assert result.isError and len(result.content) == 1, result.content
    text = result.content[0].text
    assert '\n' not in text and 'Traceback' not in text, text
    for path in (str(ROOT), str(ALLOWED_MODELS), os.path.expanduser('~'), '/tmp', 'site-packages'):
        assert path not in text, text
    return text


def data_uri(path: Path) -> str:
    return 'data:image/jpeg;base64,' + base64.b64encode(path.read_bytes()).decode()


def assert_close(got, expected, where='answer'):
    """Equal JSON, numbers within :data:`TOLERANCE`."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (where, got, expected)
        for key in expected:
            assert_close(got[key], expected[key], f'{where}.{key}')
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(expected), (where, got, expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, f'{where}[{i}]')
    elif isinstance(expected, float):
        assert isinstance(got, (int, float)) and math.isclose(got, expected, abs_tol=TOLERANCE), (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


def test_exactly_the_four_tools_each_documented_and_typed(served):
    tools = {t.name: t for t in in_a_session(served, lambda s: s.list_tools()).tools}
    assert set(tools) == set(TOOL_NAMES), 'the page endpoints (/run, /pick, /export, ...) are not tools'
    for tool in tools.values():
        assert tool.description and 'JSON' in tool.description, tool.name
        for name, schema in tool.inputSchema['properties'].items():
            assert schema.get('description') and schema.get('type'), (tool.name, name, schema)
    types = {(t, name): p['type'] for t, tool in tools.items() for name, p in tool.inputSchema['properties'].items()}
    assert types == {('predict', 'image'): 'string', ('predict', 'model'): 'string',
                     ('analyse', 'image'): 'string', ('analyse', 'models'): 'string',
                     ('analyse', 'ablation'): 'boolean',
                     ('advise_grouping', 'model'): 'string', ('advise_grouping', 'num_kv_heads'): 'integer',
                     ('kv_budget', 'model'): 'string', ('kv_budget', 'images'): 'integer'}


def test_predict_and_analyse_answer_what_this_process_computes(served, registry):
    image = load_image(str(SHIP)).image
    kdgqa = analyse(registry.get('embedded/kdgqa'), image)
    assert answer(served, 'predict', image=data_uri(SHIP), model='embedded/kdgqa') == dict(
        model='embedded/kdgqa', top5=analysis_json(kdgqa)['top5'])
    specs = ['embedded/mha', 'embedded/kdgqa', 'convert:embedded/mha:gqa:2']
    got = answer(served, 'analyse', image=data_uri(SHIP), models=' , '.join(specs), ablation=True)['models']
    expected = [analysis_json(analyse(registry.get(spec), image, deep=True)) for spec in specs]
    assert_close(got, expected)
    for model in got:  # the allocation the layers hold: every query head served once, idle heads served none
        heads, kv = model['num_heads'], model['grouping']['num_kv_heads']
        assert len(model['layers']) == len(model['summary_rows']['attention']) == model['num_layers']
        for layer in model['layers']:
            assert sum(layer['allocation']) == heads and len(layer['key_norm_shares']) == kv
            assert layer['idle_kv_heads'] == [g for g, a in enumerate(layer['allocation']) if a == 0]
        assert len(model['kv_head_ablation']['zero']) == model['num_layers']


def test_advise_grouping_is_the_grouping_the_apps_conversion_uses(served, registry):
    got = answer(served, 'advise_grouping', model='embedded/mha', num_kv_heads=2)
    assert got['spec'] == 'convert:embedded/mha:gqa:2:output-error' and got['num_heads'] == 8
    orders = registry.get(got['spec']).source_heads  # this process's advisor, run by the conversion
    assert [layer['order'] for layer in got['layers']] == orders
    assert [layer['groups'] for layer in got['layers']] == [head_groups(order, 2) for order in orders]
    assert all(layer['error_advised'] >= 0 and layer['error_consecutive'] >= 0 for layer in got['layers'])


def test_kv_budget_is_the_live_kv_budget(served, registry):
    got = answer(served, 'kv_budget', model='embedded/mha', images=8)
    assert_close(got, live_kv_budget(registry, 'embedded/mha', 8))


def page_refusal(url: str, endpoint: str, *args) -> str:
    """The one line the web page's API answers ``args`` with."""
    with pytest.raises(AppError) as refused:
        Client(url, verbose=False).predict(*args, api_name=endpoint)
    return str(refused.value)


HOSTILE_SPECS = ('hub:/etc', 'hub:../assets/models/mha', 'local:../../etc', 'x' * 10_000,
                 'convert:embedded/mha:gqa:3', 'convert:/root/x:gqa:2', 'embedded/nope')


def test_a_hostile_spec_gets_the_pages_one_line_refusal(served):
    image = handle_file(str(SHIP))
    for spec in HOSTILE_SPECS:
        expected = page_refusal(served, '/predict', image, spec)
        assert refusal(served, 'predict', image=data_uri(SHIP), model=spec) == expected, spec
    for spec in ('hub:/etc', 'embedded/gqa', 'x' * 10_000):
        assert refusal(served, 'kv_budget', model=spec, images=8) == page_refusal(served, '/kv_budget', spec, 8)
    # analyse: a model that fails gets the line its column shows; when none runs, the page's status line
    status = Client(served, verbose=False).predict(image, 'hub:/etc', '', '', '', 'attention', 0, 'mean', 'mean',
                                                   'zero', False, api_name='/run')[0]
    line = status.removeprefix('⚠️ ')
    assert line != status and refusal(served, 'analyse', image=data_uri(SHIP), models='hub:/etc') == line
    mixed = answer(served, 'analyse', image=data_uri(SHIP), models='embedded/gqa, hub:/etc')['models']
    assert mixed[0]['top5'] and mixed[1] == dict(model='hub:/etc', error=line)


def test_hostile_arguments_are_refused_in_one_line(served, tmp_path):
    assert refusal(served, 'advise_grouping', model='embedded/mha', num_kv_heads=3).endswith(
        'must be a positive divisor of the 8 heads')
    assert refusal(served, 'advise_grouping', model='embedded/mha', num_kv_heads=10**9) == \
        "G must be an integer 1..64, got '1000000000'"
    assert 'embedded/gqa: its K/V pooled by a conversion; the advisor starts from an MHA model (G = H)' in refusal(
        served, 'advise_grouping', model='embedded/gqa', num_kv_heads=2)
    assert refusal(served, 'kv_budget', model='embedded/mha', images=10**6) == \
        'number of images must be 1..256, got 1000000'
    assert refusal(served, 'analyse', image=data_uri(SHIP), models=',' * 5000).startswith('models is 5,000 characters')
    assert refusal(served, 'analyse', image=data_uri(SHIP), models='embedded/mha,' * 5) == \
        'give 1 to 4 model specs separated by commas, got 5'
    (tmp_path / 'file.jpg').write_bytes(b'not an image at all')  # named as gradio names a data: upload
    assert refusal(served, 'predict', image=data_uri(tmp_path / 'file.jpg'), model='embedded/mha') == page_refusal(
        served, '/predict', handle_file(str(tmp_path / 'file.jpg')), 'embedded/mha')
    assert answer(served, 'predict', image=data_uri(SHIP), model='embedded/mha')['top5'], 'still serving'


def test_gqa_lens_mcp_0_serves_no_mcp_endpoint():
    url, lens = launched(Settings.from_env({**os.environ, 'GQA_LENS_MCP': '0'}))
    try:
        initialise = dict(jsonrpc='2.0', id=1, method='initialize', params=dict(
            protocolVersion='2025-06-18', capabilities={}, clientInfo=dict(name='test', version='0')))
        response = httpx.post(f'{url}/gradio_api/mcp/', json=initialise,
                              headers={'Accept': 'application/json, text/event-stream'})
        assert response.status_code == 404, response.text[:200]
        assert httpx.get(f'{url}/gradio_api/mcp/schema').status_code == 404
        endpoints = Client(url, verbose=False).view_api(return_format='dict')['named_endpoints']
        assert '/predict' in endpoints and not any(name.startswith('/mcp_') for name in endpoints)
    finally:
        lens.demo.close()
