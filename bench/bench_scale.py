"""Scale benchmark: the app's code path on a DINOv2-style ViT at 518 px, and memory per browser session.

    python bench/bench_scale.py                 # one JSON line: analyse / state / render / export figures
    python bench/bench_scale.py --sessions 60   # N sessions over real HTTP -> RSS growth per session

Default mode builds a random-weight ``vit_small_patch14_reg4_dinov2`` at 518 px (37 x 37 patches + class
token + 4 registers = 1,374 tokens; no classifier head), converts it to KDGQA with G = 3, saves it as a
GQA Lens folder and loads it through the app's registry as ``local:NAME`` (no network). Then, on one image:
``analyse_s`` / ``analyse_peak_rss_mb`` (increase over the RSS before, after one warm-up request;
``first_analyse_peak_rss_mb`` is the warm-up's own), ``state_mb`` (what one session keeps
for this model), ``render_s`` (every view of one column, PNGs written and figures serialised as the app
does), ``export_s`` / ``export_peak_rss_mb`` / ``export_mb`` ("Download everything" for this model).

``--sessions N`` starts the app in a subprocess with a short session TTL, opens N sessions (a client each:
one ``/run`` with the four default embedded models, then the client closes), waits until they expire and
prints the server's ``rss_growth_mb_per_session``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = os.sysconf('SC_PAGE_SIZE')


def rss_mb(pid: int | str = 'self') -> float:
    with open(f'/proc/{pid}/statm') as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds; ``increase_mb`` is peak minus the RSS at entry."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.start = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> 'PeakRSS':
        import gc
        gc.collect()
        self.start = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def increase_mb(self) -> float:
        return self.peak - self.start


def scale(args: argparse.Namespace) -> dict:
    import timm
    import torch
    from PIL import Image
    from gqa_core import convert
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.export import export_zip
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.views import VIEWS, Choice, render
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.tempfiles import ExpiringFiles

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix='gqa-lens-bench-'))
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size, num_classes=0)
    convert(model, 'kdgqa', 3)
    save_pretrained(model, work / 'models' / 'dinov2-kdgqa')
    del model
    registry = ModelRegistry(ROOT / 'assets' / 'models', model_dirs=[str(work / 'models')])
    loaded = registry.get('local:dinov2-kdgqa')
    image = Image.open(args.image).convert('RGB')
    with PeakRSS() as cold:  # the first request also grows the allocator's pools
        analyse(loaded, image)
    with PeakRSS() as mem:
        start = time.perf_counter()
        analysis = analyse(loaded, image)
        analyse_s = time.perf_counter() - start
    files = ExpiringFiles(ttl=60)
    layer = len(analysis.recording.layers) - 1
    start = time.perf_counter()
    for name in VIEWS:  # every view a visitor can switch to, as the app serves it
        shown = render(analysis, Choice(name, layer))
        if shown.picture is not None:
            files.write_png(shown.picture)
        elif shown.figure is not None:
            shown.figure.to_json()
    render_s = time.perf_counter() - start
    path = work / 'export.zip'
    with PeakRSS() as export_mem:
        start = time.perf_counter()
        export_zip([analysis], layer, 'mean', 'mean', path, registry)
        export_s = time.perf_counter() - start
    result = dict(
        model=f'{args.model} img_size={args.img_size} kdgqa G=3 (random weights, headless)',
        tokens=int(analysis.recording.layers[0].attention.shape[-1]), threads=torch.get_num_threads(),
        analyse_s=round(analyse_s, 3), analyse_peak_rss_mb=round(mem.increase_mb, 1),
        first_analyse_peak_rss_mb=round(cold.increase_mb, 1),
        state_mb=round(analysis.nbytes() / 2**20, 2), render_s=round(render_s, 3),
        export_s=round(export_s, 2), export_peak_rss_mb=round(export_mem.increase_mb, 1),
        export_mb=round(path.stat().st_size / 2**20, 1),
    )
    files.close()
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return result


def sessions(args: argparse.Namespace) -> dict:
    from gradio_client import Client, handle_file
    from gqa_core.lens.models import DEFAULT_MODELS
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GQA_LENS_SESSION_TTL=str(args.ttl), HF_HUB_OFFLINE='1')
    server = subprocess.Popen([sys.executable, 'app.py', '--port', str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f'http://127.0.0.1:{port}'
        import httpx
        for _ in range(1500):  # up to 5 minutes for the app to answer
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        def one_session() -> None:
            client = Client(url, verbose=False)
            client.predict(handle_file(args.image), *DEFAULT_MODELS, 3, 'mean', 'mean', 'zero', False, api_name='/run')
            client.close()

        def settle() -> float:
            time.sleep(args.ttl + max(args.ttl / 4, 0.5) + 2)  # expiry + one reaper round
            return rss_mb(server.pid)

        for _ in range(args.warmup):  # models loaded, caches and allocator pools at steady state
            one_session()
        before = settle()
        start = time.perf_counter()
        for _ in range(args.sessions):
            one_session()
        elapsed = time.perf_counter() - start
        peak = rss_mb(server.pid)
        after = settle()
    finally:
        server.kill()
        server.wait()
    return dict(sessions=args.sessions, session_ttl_s=args.ttl, seconds_per_session=round(elapsed / args.sessions, 2),
                rss_before_mb=round(before, 1), rss_with_sessions_mb=round(peak, 1), rss_after_expiry_mb=round(after, 1),
                rss_growth_mb_per_session=round((after - before) / args.sessions, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_small_patch14_reg4_dinov2')
    parser.add_argument('--img-size', type=int, default=518)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--image', default=str(ROOT / 'assets' / 'examples' / 'grace_hopper.jpg'))
    parser.add_argument('--sessions', type=int, default=0, help='measure RSS growth over N HTTP sessions instead')
    parser.add_argument('--warmup', type=int, default=5, help='sessions run before the baseline (--sessions)')
    parser.add_argument('--ttl', type=float, default=5.0, help="the app's session TTL in seconds (--sessions)")
    args = parser.parse_args()
    print(json.dumps(sessions(args) if args.sessions else scale(args)))


if __name__ == '__main__':
    main()
