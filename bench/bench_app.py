"""Latency of one app request (four embedded models, the default view) over real HTTP with gradio_client, and of
switching views (re-rendered from the session, in process).

    python bench/bench_app.py --requests 10

Launches the app in-process on 127.0.0.1, warms it up (first request loads the models), then times
``/run`` with the four default embedded models on an example image and prints median / p95 / max.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--requests', type=int, default=10)
    parser.add_argument('--deep', action='store_true', help='with the which-heads-matter panels (ablation, faithfulness)')
    parser.add_argument('--image', default=str(ROOT / 'assets' / 'examples' / 'grace_hopper.jpg'))
    args = parser.parse_args()
    import app
    import torch
    from gradio_client import Client, handle_file
    from gqa_core.lens.models import DEFAULT_MODELS
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    app.demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f'http://127.0.0.1:{port}', verbose=False)
        call = lambda: client.predict(handle_file(args.image), *DEFAULT_MODELS, 'attention', 3, 'mean', 'mean', 'zero',  # noqa: E731
                                      args.deep, api_name='/run')
        call()
        latencies = []
        for _ in range(args.requests):
            start = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - start)
    finally:
        app.demo.close()
    latencies.sort()
    # What the "which heads matter" panels (ablation + faithfulness; diversity is drawn from recorded data) add
    # to one column, in process: analyse with and without them, per embedded model.
    from PIL import Image
    from gqa_core.lens.analysis import analyse
    image = Image.open(args.image)
    added = {}
    for spec in DEFAULT_MODELS:
        loaded = app.lens.registry.get(spec)
        runs = {True: [], False: []}
        for _ in range(5):
            for deep in (False, True):
                start = time.perf_counter()
                analyse(loaded, image, deep=deep)
                runs[deep].append(time.perf_counter() - start)
        added[spec] = statistics.median(runs[True]) - statistics.median(runs[False])
    print(f'threads={torch.get_num_threads()} models={",".join(DEFAULT_MODELS)} image={Path(args.image).name}')
    print(f'one /run request, 4 models, default view{" + ablation + faithfulness" if args.deep else ""}: median {statistics.median(latencies) * 1000:.0f} ms, '
          f'p95 {latencies[max(0, int(0.95 * len(latencies)) - 1)] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms '
          f'over {len(latencies)} requests')
    print('ablation + faithfulness add per column (median of 5): '
          + ', '.join(f'{spec} {ms * 1000:.0f} ms' for spec, ms in added.items()))
    # Switching views re-renders from the session's analyses (what the view selector's handler does): no model runs.
    from gqa_core.lens.views import VIEWS, run_models
    analyses, _, _ = run_models(app.lens.registry, args.image, list(DEFAULT_MODELS), deep=True)
    switch = {}
    for view in VIEWS.values():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            app.lens.rerender(analyses, view.label, 3, 'mean', 'mean', 'zero')
            times.append(time.perf_counter() - start)
        switch[view.label] = statistics.median(times)
    print('switching to a view, 4 columns re-rendered from the session (median of 5): '
          + ', '.join(f'{label} {t * 1000:.0f} ms' for label, t in switch.items()))


if __name__ == '__main__':
    main()
