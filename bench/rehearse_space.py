"""Build the Space the way Hugging Face does, here, and time it: a clean folder with only the files the Space
repo holds (what git tracks), a fresh venv on the front matter's ``python_version``, ``pip install -r
requirements.txt``, then ``python app.py``; wait for the page, run one ``/run`` over HTTP with the four default
models, print one JSON line (build seconds, venv size, start and first-request seconds).

    python bench/rehearse_space.py [--keep DIR]
    hf upload YOU/gqa-lens DIR/space --repo-type space     # publish exactly what was rehearsed

The Space holds the tracked files except ``SPACE_EXCLUDES``: training state committed so that long runs span
sittings (``checkpoints/``) is no part of the app.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE_EXCLUDES = ('checkpoints/',)


def front_matter(readme: Path) -> dict:
    block = readme.read_text().split('---')[1]
    return {k.strip(): v.strip().strip('"') for k, _, v in (line.partition(':') for line in block.splitlines())
            if k.strip()}


def interpreter(version: str) -> str:
    """``pythonX.Y`` on PATH, else a pyenv build of it."""
    found = shutil.which(f'python{version}')
    if found:
        return found
    for candidate in sorted(Path(os.environ.get('PYENV_ROOT', Path.home() / '.pyenv'), 'versions').glob(f'{version}.*')):
        if (candidate / 'bin' / 'python').is_file():
            return str(candidate / 'bin' / 'python')
    raise SystemExit(f'no Python {version} on this machine (the front matter asks for it)')


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file() and not f.is_symlink()) / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--keep', help='build here and keep it (default: a temporary folder, removed after)')
    args = parser.parse_args()
    meta = front_matter(ROOT / 'README.md')
    version = meta.get('python_version', '3.10')  # the platform's default when the front matter names none
    work = Path(args.keep or tempfile.mkdtemp(prefix='space-'))
    space, venv = work / 'space', work / 'venv'
    shutil.rmtree(work / 'space', ignore_errors=True)
    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [name for name in files if not name.startswith(SPACE_EXCLUDES)]
    for name in files:  # what the Space repo holds: the tracked files, nothing built or cached
        (space / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, space / name)
    start = time.perf_counter()
    subprocess.run([interpreter(version), '-m', 'venv', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    subprocess.run([python, '-m', 'pip', 'install', '-q', '-r', 'requirements.txt'], cwd=space, check=True)
    build_s = time.perf_counter() - start
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME='127.0.0.1', GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE='1',
               GRADIO_ANALYTICS_ENABLED='False', HF_HUB_DISABLE_TELEMETRY='1', PYTHONPATH='')
    env.pop('VIRTUAL_ENV', None)
    start = time.perf_counter()
    server = subprocess.Popen([python, 'app.py'], cwd=space, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f'http://127.0.0.1:{port}'
        import httpx
        while True:
            if server.poll() is not None:
                raise SystemExit('the app exited: ' + server.stderr.read()[-3000:])
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        start_s = time.perf_counter() - start
        from gradio_client import Client, handle_file
        client = Client(url, verbose=False)
        start = time.perf_counter()
        out = client.predict(handle_file(str(space / 'assets' / 'examples' / 'grace_hopper.jpg')), 'embedded/mha',
                             'embedded/gqa', 'embedded/kdgqa', 'embedded/dgqa-diff', 'attention', 0, 'mean', 'mean', 'zero', False,
                             api_name='/run')
        first_s = time.perf_counter() - start
        python_seen = subprocess.run([python, '-c', 'import sys; print(sys.version.split()[0])'],
                                     capture_output=True, text=True).stdout.strip()
        from app import COLUMN
        summaries = [re.sub(r'\s+', ' ', str(s))[:60] for s in out[3::len(COLUMN)][:4]]
        print(json.dumps(dict(python=python_seen, files=len(files), build_s=round(build_s, 1),
                              venv_mb=round(folder_size_mb(venv)), start_s=round(start_s, 1),
                              first_run_s=round(first_s, 2), status=out[0], columns=summaries)))
    finally:
        server.kill()
        server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
