"""Model spec strings, as typed by anyone who can reach the app: parsed strictly, never trusted.

    embedded/NAME                      a model shipped in ``assets/models``
    local:NAME                         a model folder in a directory the operator allowed
                                       (``GQA_LENS_MODEL_DIRS``, or ``python app.py --model-dir DIR``)
    hub:ORG/NAME[@REVISION]            a saved GQA Lens model on the Hugging Face Hub
    convert:SOURCE:VARIANT:G[:ORDER][:INIT]
                                       training-free conversion of SOURCE, one of the above, ``hf-hub:ORG/NAME``
                                       (a timm-format repo) or a timm ViT name with Hub weights;
                                       G is 1..64, or ``native``: each block keeps the K/V heads it has (a
                                       model that shares them already, e.g. timm's Sapiens2); ORDER (which
                                       heads share a KV head) is ``consecutive`` (default) or
                                       ``output-error`` (the head-order advisor);
                                       INIT is ``mean`` (default: K/V heads mean-pooled) or ``calibrated``
                                       (fitted to the MHA on the shipped images, :mod:`gqa_core.core.calibrate`)

A spec never names a server path: ``NAME`` is one path component resolved strictly inside its folder, a Hub
id is only ever looked up on the Hub, and every message quotes at most a short prefix of what was typed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ..core.convert import INITS
from ..core.head_order import HEAD_ORDERS
from ..core.settings import Settings
from ..io.safe_config import BACKBONE_NAME

__all__ = ['Spec', 'SpecError', 'parse_spec', 'NATIVE_G', 'conversion_spec', 'shown', 'resolve_in', 'allowed_model_dirs', 'MAX_SPEC_CHARS',
           'public_message']

MAX_SPEC_CHARS = 200
MAX_G = 64
NATIVE_G = 0  # Spec.num_kv_heads of ``convert:SOURCE:VARIANT:native``
NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$')  # a folder name, or each half of a Hub repo id
REVISION = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$')
KINDS_HELP = 'use embedded/NAME, local:NAME, hub:ORG/NAME[@REVISION] or convert:SOURCE:VARIANT:G[:ORDER][:INIT]'


class SpecError(ValueError):
    """A spec string that cannot be accepted; the message says which rule it breaks."""


def shown(text: str, limit: int = 60) -> str:
    """``text`` safe to echo: printable, quoted, at most ``limit`` characters."""
    text = ''.join(c if c.isprintable() else '?' for c in str(text))
    return repr(text if len(text) <= limit else text[:limit - 1] + '…')


@dataclass(frozen=True)
class Spec:
    kind: str  # 'embedded' | 'local' | 'hub' | 'hf-hub' | 'timm' | 'convert'
    name: str = ''  # folder name, repo id or timm name
    revision: Optional[str] = None
    source: Optional['Spec'] = None  # convert only
    variant: str = ''
    num_kv_heads: int = 0  # convert only; NATIVE_G: each block keeps the K/V heads it has
    head_order: str = 'consecutive'  # convert only: gqa_core.core.head_order.HEAD_ORDERS
    init: str = 'mean'  # convert only: how the shared K/V heads are made (gqa_core.core.convert.INITS)

    def __str__(self) -> str:
        if self.kind == 'convert':
            suffix = '' if self.head_order == 'consecutive' else f':{self.head_order}'
            suffix += '' if self.init == 'mean' else f':{self.init}'
            g = 'native' if self.num_kv_heads == NATIVE_G else self.num_kv_heads
            return f'convert:{self.source}:{self.variant}:{g}{suffix}'
        rev = f'@{self.revision}' if self.revision else ''
        return {'embedded': f'embedded/{self.name}', 'local': f'local:{self.name}', 'hub': f'hub:{self.name}{rev}',
                'hf-hub': f'hf-hub:{self.name}{rev}', 'timm': self.name}[self.kind]

    @property
    def kv_heads(self) -> Optional[int]:
        """G as :func:`~gqa_core.core.convert.convert` takes it (None: each block keeps its own)."""
        return None if self.num_kv_heads == NATIVE_G else self.num_kv_heads


def _name(value: str, what: str) -> str:
    if not NAME.match(value) or '..' in value:
        raise SpecError(f'{what} must be one folder name (letters, digits, _ . -), got {shown(value)}')
    return value


def _repo(value: str, prefix: str) -> tuple:
    repo, at, revision = value.partition('@')
    parts = repo.split('/')
    if (len(parts) != 2 or not all(NAME.match(p) for p in parts) or '--' in repo or '..' in repo
            or any(p.endswith('.') or p.endswith('-') for p in parts)):
        raise SpecError(f'{prefix}ORG/NAME needs a Hub repo id (ORG/NAME: letters, digits, _ . -), got {shown(value)}')
    if at and (not REVISION.match(revision) or '..' in revision):
        raise SpecError(f'{prefix}ORG/NAME@REVISION: invalid revision {shown(revision)}')
    return repo, (revision or None)


def _source(text: str, variants: Sequence[str]) -> Spec:
    if text.startswith('hf-hub:'):
        repo, revision = _repo(text[len('hf-hub:'):], 'hf-hub:')
        return Spec('hf-hub', repo, revision)
    spec = parse_spec(text, variants, allow_convert=False) if ':' in text or '/' in text else None
    if spec is not None:
        return spec
    if not BACKBONE_NAME.match(text):  # a timm model name, as configs name backbones
        raise SpecError(f'convert source {shown(text)} is not embedded/NAME, local:NAME, hub:ORG/NAME, '
                        'hf-hub:ORG/NAME or a timm model name')
    return Spec('timm', text)


def parse_spec(spec: Optional[str], variants: Sequence[str] = (), allow_convert: bool = True) -> Spec:
    """Parse and validate ``spec``; raise :class:`SpecError` naming the broken rule."""
    if not isinstance(spec, str):
        raise SpecError('no model chosen')
    if len(spec) > MAX_SPEC_CHARS:
        raise SpecError(f'model spec is {len(spec):,} characters; the limit is {MAX_SPEC_CHARS}')
    spec = spec.strip()
    if not spec:
        raise SpecError('no model chosen')
    if spec.startswith('embedded/'):
        return Spec('embedded', _name(spec[len('embedded/'):], 'embedded/NAME'))
    if spec.startswith('local:'):
        return Spec('local', _name(spec[len('local:'):], 'local:NAME'))
    if spec.startswith('hub:'):
        repo, revision = _repo(spec[len('hub:'):], 'hub:')
        return Spec('hub', repo, revision)
    if spec.startswith('convert:') and allow_convert:
        body, head_order, init = spec[len('convert:'):], 'consecutive', 'mean'
        for name in INITS:
            if body.endswith(':' + name):
                body, init = body[:-len(name) - 1], name
        for name in HEAD_ORDERS:
            if body.endswith(':' + name):
                body, head_order = body[:-len(name) - 1], name
        parts = body.rsplit(':', 2)
        if len(parts) != 3:
            raise SpecError(f'{shown(spec)}: expected convert:SOURCE:VARIANT:G')
        source, variant, g = parts
        if variants and variant not in variants:
            raise SpecError(f'unknown variant {shown(variant)}; choose one of {", ".join(variants)}')
        if g != 'native' and (not re.fullmatch(r'[0-9]{1,2}', g) or not 1 <= int(g) <= MAX_G):
            raise SpecError(f'G must be an integer 1..{MAX_G} or native, got {shown(g)}')
        if g == 'native' and head_order != 'consecutive':
            raise SpecError(f'{head_order} chooses groups for one G; native keeps the groups the model was built '
                            'with (give a G to regroup it)')
        return Spec('convert', source=_source(source, variants), variant=variant,
                    num_kv_heads=NATIVE_G if g == 'native' else int(g), head_order=head_order, init=init)
    raise SpecError(f'unknown model spec {shown(spec)}: {KINDS_HELP}')


def resolve_in(folder: Path, name: str) -> Optional[Path]:
    """``folder/name`` if it is a model folder strictly inside ``folder`` (symlinks resolved), else None."""
    root = folder.resolve()
    path = (root / _name(name, 'NAME')).resolve()
    if path.parent != root or not (path / 'config.json').is_file():
        return None
    return path


def allowed_model_dirs(extra: Sequence[str] = ()) -> List[Path]:
    """Folders the operator allowed for ``local:NAME``: ``GQA_LENS_MODEL_DIRS`` (os.pathsep-separated) + ``extra``."""
    listed = Settings.from_env().model_dirs
    found = [Path(p).expanduser().resolve() for p in [*listed, *extra] if Path(p).expanduser().is_dir()]
    return list(dict.fromkeys(found))  # a folder named twice (environment and command line) is served once


ABSOLUTE_PATH = re.compile(r'''(?:(?<=^)|(?<=[\s'"(=\[,:]))(?:/|[A-Za-z]:\\)[^\s'"()\],]*''')


def public_message(message: str, limit: int = 400) -> str:
    """An error message fit for strangers: absolute paths (and ``scheme://`` addresses) replaced by ``…``,
    length capped."""
    text = ABSOLUTE_PATH.sub('…', str(message))
    return text if len(text) <= limit else text[:limit - 1] + '…'


def conversion_spec(source: str, variant: str, num_kv_heads: int, head_order: str = 'consecutive',
                    init: str = 'mean') -> str:
    """The canonical ``convert:`` spec of ``source`` (a spec itself, checked) and the conversion's parts
    (``num_kv_heads`` :data:`NATIVE_G`: each block keeps its own)."""
    return str(parse_spec(str(Spec('convert', source=_source(str(source).strip(), ()), variant=variant,
                                   num_kv_heads=int(num_kv_heads), head_order=head_order, init=init))))
