"""What the tests share besides fixtures (those are in ``tests/conftest.py``): paths, a tiny real ViT, the
folder the app may serve hostile models from, and the app in its own process."""
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / 'assets' / 'examples'
# A folder the app is allowed to serve models from (local:NAME); tests write hostile model folders into it.
ALLOWED_MODELS = Path(tempfile.mkdtemp(prefix='gqa-lens-allowed-'))


def tiny_vit(num_heads: int = 6, depth: int = 2, head_dim: int = 8, **kwargs) -> VisionTransformer:
    """A real timm VisionTransformer small enough for exhaustive tests (32 px, patch 8 -> 16 patches)."""
    torch.manual_seed(kwargs.pop('seed', 0))
    args = dict(img_size=32, patch_size=8, embed_dim=num_heads * head_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=2.0, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


def perturbed_model(name: str, **args) -> torch.nn.Module:
    """timm's ``name`` built with ``args`` (random weights), every parameter perturbed, seeded: biases and
    position tables are zero at init, and a test must see them."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def model_images(model: torch.nn.Module, n: int = 2) -> torch.Tensor:
    """``n`` seeded random images of the model's input size (what the app shows it: its preprocessing's)."""
    from gqa_core.io.preprocessing import model_preprocessing
    size = model_preprocessing(model)['input_size'][1:]
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serve_app(port: int, env: dict, log) -> subprocess.Popen:
    """``python app.py --port PORT`` in its own process, returned once it answers HTTP (killed if it never does)."""
    proc = subprocess.Popen([sys.executable, 'app.py', '--port', str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f'http://127.0.0.1:{port}', timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f'the app did not start on port {port} (exit code {proc.poll()})')
