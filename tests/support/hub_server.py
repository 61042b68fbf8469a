"""A real HTTP server on 127.0.0.1 answering the Hub's file routes from a local folder.

``GET|HEAD /{org}/{name}/resolve/{revision}/{path}`` (models) and ``/datasets/{org}/{name}/resolve/...``
(datasets) serve ``root/org/name/path`` with the headers huggingface_hub reads (X-Repo-Commit, ETag,
Content-Length) and the Hub's X-Error-Code on 404s. A dataset repo also answers the API routes
``datasets.load_dataset("org/name")`` and its streaming mode ask before they read a file: the repo's info
(``/api/datasets/{org}/{name}[/revision/{rev}]``), its file tree (``.../tree/{rev}[/{path}]``) and
``.../paths-info/{rev}`` (POST); a file read honours ``Range`` (streaming reads parquet footers that way). Repos under an org listed in ``private`` are served only
to requests that carry ``token`` (as the Hub does: 401 RepoNotFound otherwise); ``requests`` records every
request's path and Authorization header, so a test can see which requests carried a token.
"""
import hashlib
import json
import re
from urllib.parse import parse_qs, unquote
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = 'a' * 40


class HubHandler(BaseHTTPRequestHandler):
    def __init__(self, *args, root: Path, private: tuple, token: str, requests: list, **kwargs):
        self.root, self.private, self.token, self.requests = root, private, token, requests
        super().__init__(*args, **kwargs)

    def log_message(self, *args):
        pass

    def _resolve(self):
        parts = self.path.split('?')[0].strip('/').split('/')
        if parts and parts[0] == 'datasets':
            parts = parts[1:]
        if len(parts) < 5 or parts[2] != 'resolve':
            return None, 'EntryNotFound'
        repo = self.root / parts[0] / parts[1]
        if not repo.is_dir():
            return None, 'RepoNotFound'
        if parts[0] in self.private and self.headers.get('Authorization') != f'Bearer {self.token}':
            return None, 'RepoNotFound'  # the Hub does not say whether a private repo exists
        path = repo.joinpath(*parts[4:])
        return (path, None) if path.is_file() else (None, 'EntryNotFound')

    def _respond(self, body: bool):
        self.requests.append((self.path, self.headers.get('Authorization')))
        path, error = self._resolve()
        if error:
            self.send_response(404 if error == 'EntryNotFound' else 401)
            self.send_header('X-Error-Code', error)
            self.send_header('X-Repo-Commit', COMMIT)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        wanted = re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range') or '')
        if wanted:
            first = int(wanted[1]) if wanted[1] else max(0, len(data) - int(wanted[2]))
            last = int(wanted[2]) if wanted[1] and wanted[2] else len(data) - 1
            whole, data = len(data), data[first:last + 1]
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {first}-{first + len(data) - 1}/{whole}')
        else:
            self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', etag)
        self.send_header('Accept-Ranges', 'bytes')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Content-Type', 'application/octet-stream')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._respond(body=False)

    def do_GET(self):
        if self.path.startswith('/api/datasets/'):
            return self._dataset_api(None)
        self._respond(body=True)

    def do_POST(self):
        length = int(self.headers.get('Content-Length') or 0)
        form = parse_qs(self.rfile.read(length).decode()) if length else {}
        self._dataset_api(form.get('paths', []))

    def _entry(self, repo: Path, path: Path) -> dict:
        """One tree entry as the Hub's API lists it."""
        name = path.relative_to(repo).as_posix()
        if path.is_dir():
            return dict(type='directory', path=name, oid=hashlib.sha1(name.encode()).hexdigest())
        data = path.read_bytes()
        return dict(type='file', path=name, size=len(data), oid=hashlib.sha1(data).hexdigest())

    def _dataset_api(self, paths):
        """``/api/datasets/{org}/{name}`` (info), ``.../revision/{rev}``, ``.../tree/{rev}[/{path}]`` and
        ``.../paths-info/{rev}`` (POST ``paths``) for a dataset repo under ``root``."""
        self.requests.append((self.path, self.headers.get('Authorization')))
        route, _, query = self.path.partition('?')
        match = re.fullmatch(r'/api/datasets/([^/]+)/([^/]+)(?:/(revision|tree|paths-info)/([^/]+)(/.*)?)?', route)
        repo = self.root / match[1] / match[2] if match else None
        if repo is None or not repo.is_dir() or match[1] in self.private:
            return self._json(404, dict(error='Repository not found'), 'RepoNotFound')
        files = sorted(p for p in repo.rglob('*') if p.is_file())
        if match[3] in (None, 'revision'):
            return self._json(200, dict(id=f'{match[1]}/{match[2]}', sha=COMMIT, private=False, disabled=False,
                                        siblings=[dict(rfilename=p.relative_to(repo).as_posix()) for p in files]))
        if match[3] == 'paths-info':
            found = [repo / unquote(p) for p in paths]
            return self._json(200, [self._entry(repo, p) for p in found if p.exists()])
        folder = repo / unquote((match[5] or '').strip('/'))
        if not folder.is_dir():
            return self._json(404, dict(error='not found'), 'EntryNotFound')
        recursive = parse_qs(query).get('recursive', ['false'])[0].lower() == 'true'
        children = folder.rglob('*') if recursive else folder.iterdir()
        self._json(200, [self._entry(repo, p) for p in sorted(children)])

    def _json(self, status: int, body, error: str = ''):
        data = json.dumps(body).encode()
        self.send_response(status)
        if error:
            self.send_header('X-Error-Code', error)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HubServer:
    def __init__(self, root: Path, private: tuple = (), token: str = ''):
        self.requests: list = []
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(HubHandler, root=Path(root), private=tuple(private),
                                                                   token=token, requests=self.requests))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
