"""A real HTTP server on 127.0.0.1 answering the Hub's file routes from a local folder.

``GET|HEAD /{org}/{name}/resolve/{revision}/{path}`` (models) and ``/datasets/{org}/{name}/resolve/...``
(datasets) serve ``root/org/name/path`` with the headers huggingface_hub reads (X-Repo-Commit, ETag,
Content-Length) and the Hub's X-Error-Code on 404s. Repos under an org listed in ``private`` are served only
to requests that carry ``token`` (as the Hub does: 401 RepoNotFound otherwise); ``requests`` records every
request's path and Authorization header, so a test can see which requests carried a token.
"""
import hashlib
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
        self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Content-Type', 'application/octet-stream')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._respond(body=False)

    def do_GET(self):
        self._respond(body=True)


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
