"""A real HTTP server on 127.0.0.1 answering the Hub's file routes from a local folder.

``GET|HEAD /{org}/{name}/resolve/{revision}/{path}`` serves ``root/org/name/path`` with the headers
huggingface_hub reads (X-Repo-Commit, ETag, Content-Length) and the Hub's X-Error-Code on 404s.
"""
import hashlib
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = 'a' * 40


class HubHandler(BaseHTTPRequestHandler):
    def __init__(self, *args, root: Path, **kwargs):
        self.root = root
        super().__init__(*args, **kwargs)

    def log_message(self, *args):
        pass

    def _resolve(self):
        parts = self.path.split('?')[0].strip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return None, 'EntryNotFound'
        repo = self.root / parts[0] / parts[1]
        if not repo.is_dir():
            return None, 'RepoNotFound'
        path = repo.joinpath(*parts[4:])
        return (path, None) if path.is_file() else (None, 'EntryNotFound')

    def _respond(self, body: bool):
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
    def __init__(self, root: Path):
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(HubHandler, root=Path(root)))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
