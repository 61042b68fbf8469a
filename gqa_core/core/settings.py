"""Every operator setting of GQA Lens, read from the environment in this one place.

=============================== ========================= =============================================================
variable                        default                   what it decides
=============================== ========================= =============================================================
``GQA_LENS_MODELS``             ``assets/models``         the embedded models' folder (``embedded/NAME``)
``GQA_LENS_MODEL_DIRS``         none                      folders (``os.pathsep``-separated) served as ``local:NAME``
``GQA_LENS_MAX_PARAMS``         350,000,000               the largest model a spec may build, in parameters
``GQA_LENS_MAX_TOKENS``         2,048                     ... and in tokens per image (3,100 admits Sapiens2 at
                                                          1024 x 768: 3,081 tokens; the analysis's memory stays bounded)
``GQA_LENS_DEEP_MAX_TOKENS``    2,048                     the largest model the deep per-image analyses (head
                                                          ablation, faithfulness) run on live, in tokens per image
``GQA_LENS_DEEP_MAX_CPU_TFLOP`` 40                        ... and, where they run on the CPU, in their arithmetic
                                                          for one run's models together (about 4.5 min on two
                                                          cores; :mod:`gqa_core.lens.deep_work`)
``GQA_LENS_SESSION_TTL``        1800                      seconds an idle app session keeps its results
``GQA_LENS_TOKEN_REPOS``        none                      Hub repos (``ORG/NAME``, ``ORG/*``; comma-separated) whose
                                                          downloads may carry the server's token
``GQA_LENS_CONCURRENCY``        2                         app requests that run at once
``GQA_LENS_QUEUE_SIZE``         32 x concurrency          app requests that may wait (more are refused)
``GQA_LENS_DEVICE``             ``auto``                  where models run: ``auto`` (CUDA when there is one), ``cpu``,
                                                          ``cuda``, ``cuda:N``
``GQA_LENS_TRITON``             ``0``                     ``1``: KDGQA through the Triton routing kernel on CUDA
``GQA_LENS_CACHE``              ``~/.cache/gqa_lens``     downloaded datasets and decoded images
``GQA_LENS_CIFAR10``            none                      a path to ``cifar10-jpeg.tar.gz`` (checked by its sha256)
``GQA_LENS_CIFAR10_REPO``       ``gqa-lens/cifar10-jpeg`` the Hub dataset repo it is downloaded from otherwise
``GQA_LENS_MCP``                ``1``                     ``0``: no MCP server (``/gradio_api/mcp/``) beside the app
=============================== ========================= =============================================================

:meth:`Settings.from_env` reads them all whenever asked (cheap), so a process's settings are whatever its
environment says at that moment; a value that does not parse is a ``ValueError`` naming the variable. Command
lines and :func:`dataclasses.replace` override single fields.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

__all__ = ['Settings', 'PREFIX', 'EMBEDDED_DIR', 'DEFAULT_CIFAR10_REPO']

PREFIX = 'GQA_LENS_'
EMBEDDED_DIR = Path(__file__).resolve().parents[2] / 'assets' / 'models'
DEFAULT_CIFAR10_REPO = 'gqa-lens/cifar10-jpeg'


def _paths(text: str) -> Tuple[str, ...]:
    return tuple(p for p in text.split(os.pathsep) if p.strip())


def _names(text: str) -> Tuple[str, ...]:
    return tuple(p.strip() for p in text.split(',') if p.strip())


def _flag(text: str) -> bool:
    if text.strip() not in ('0', '1'):
        raise ValueError('must be 0 or 1')
    return text.strip() == '1'


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise ValueError('must be positive')
        return value
    return parse


# how each field's variable is parsed (the variable is PREFIX + the field's name in capitals)
_PARSERS: Dict[str, Callable[[str], Any]] = dict(
    models=Path, model_dirs=_paths, max_params=_positive(int), max_tokens=_positive(int),
    deep_max_tokens=_positive(int), deep_max_cpu_tflop=_positive(float), session_ttl=_positive(float),
    token_repos=_names, concurrency=_positive(int),
    queue_size=_positive(int), device=str, triton=_flag, cache=lambda t: Path(t).expanduser(),
    cifar10=lambda t: Path(t).expanduser(), cifar10_repo=str, mcp=_flag)


@dataclass(frozen=True)
class Settings:
    """What the operator decides (see the module's table; one field per ``GQA_LENS_*`` variable).

    Args:
        models: folder of the embedded models.
        model_dirs: folders whose model sub-folders are served as ``local:NAME``.
        max_params: parameters of the largest model a spec may build.
        max_tokens: tokens per image of the largest model a spec may build.
        deep_max_tokens: tokens per image up to which head ablation and faithfulness run live.
        deep_max_cpu_tflop: TFLOP of one run's head ablations and faithfulness (its models together) up to which
            they run live on the CPU (:func:`~gqa_core.lens.deep_work.deep_tflop`).
        session_ttl: seconds an idle app session keeps its results.
        token_repos: Hub repo patterns whose downloads may carry the server's token.
        concurrency: app requests that run at once.
        queue_size: app requests that may wait; None: 32 x ``concurrency``.
        device: where models run; None: ``auto``.
        triton: whether KDGQA uses the Triton routing kernel on CUDA.
        cache: the project's cache folder.
        cifar10: an explicit path to the CIFAR-10 archive.
        cifar10_repo: the Hub dataset repo holding the CIFAR-10 archive.
        mcp: whether the app also serves its MCP tools (:mod:`gqa_core.lens.tools`) at ``/gradio_api/mcp/``.
    """
    models: Path = EMBEDDED_DIR
    model_dirs: Tuple[str, ...] = ()
    max_params: int = 350_000_000
    max_tokens: int = 2_048
    deep_max_tokens: int = 2_048
    deep_max_cpu_tflop: float = 40.0
    session_ttl: float = 1800.0
    token_repos: Tuple[str, ...] = ()
    concurrency: int = 2
    queue_size: Optional[int] = None
    device: Optional[str] = None
    triton: bool = False
    cache: Path = Path.home() / '.cache' / 'gqa_lens'
    cifar10: Optional[Path] = None
    cifar10_repo: str = DEFAULT_CIFAR10_REPO
    mcp: bool = True

    @staticmethod
    def variable(name: str) -> str:
        """The environment variable of field ``name``."""
        return PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> 'Settings':
        """The settings the environment gives (unset or blank variables keep their defaults)."""
        env = os.environ if environ is None else environ
        values: Dict[str, Any] = {}
        for f in fields(cls):
            text = env.get(cls.variable(f.name), '')
            if not text.strip():
                continue
            try:
                values[f.name] = _PARSERS[f.name](text)
            except ValueError as e:
                raise ValueError(f'{cls.variable(f.name)}={text[:40]!r}: {e}') from None
        return cls(**values)

    @property
    def queue_limit(self) -> int:
        """Requests that may wait: ``queue_size``, else 32 per concurrent request."""
        return self.queue_size if self.queue_size is not None else 32 * self.concurrency
