"""CIFAR-10 exactly as this project trains and measures on it: the 50,000 train + 10,000 test images as
32 x 32 JPEGs in ImageFolder layout (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``), one 19 MB archive,
``cifar10-jpeg.tar.gz``, identified by its sha256. The embedded family's accuracies are measured on these
bytes, so every copy is checked against the checksum.

:func:`find_cifar10` looks, in order, at ``GQA_LENS_CIFAR10`` (a path to the archive), the project's cache
(``$GQA_LENS_CACHE/datasets``, default ``~/.cache/gqa_lens/datasets``), ``../shared/data`` beside the
checkout (this project's own machines), and otherwise downloads it from the Hub dataset repo
``GQA_LENS_CIFAR10_REPO`` into the cache (never with a token: it is public data). The repo is published once
by the project's owner:

    python -m gqa_core.training.cifar10 --push ORG/NAME    # uploads the archive found above
    python -m gqa_core.training.cifar10                    # prints where it is (downloading it if needed)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Tuple

from .data import cache_root
from ..core.settings import DEFAULT_CIFAR10_REPO, Settings

__all__ = ['ARCHIVE_NAME', 'SHA256', 'DEFAULT_REPO', 'DatasetMissing', 'find_cifar10', 'fetch_cifar10',
           'sha256_of']

ARCHIVE_NAME = 'cifar10-jpeg.tar.gz'
SHA256 = 'f22efd5e22a7bf271422067de9f5fe9031c247ab7c733f81213fd7a785875b24'
DEFAULT_REPO = DEFAULT_CIFAR10_REPO
SHARED = Path(__file__).resolve().parents[3] / 'shared' / 'data' / ARCHIVE_NAME


class DatasetMissing(FileNotFoundError):
    """No verified copy of the archive could be found or fetched; the message says how to provide one."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _candidates() -> Iterator[Tuple[str, Path]]:
    explicit = Settings.from_env().cifar10
    if explicit:
        yield 'GQA_LENS_CIFAR10', explicit
    yield 'the cache', cache_root() / 'datasets' / ARCHIVE_NAME
    yield '../shared/data', SHARED


def fetch_cifar10(repo: Optional[str] = None, sha256: str = SHA256, target: Optional[Path] = None,
                  revision: Optional[str] = None) -> Path:
    """Download the archive from the Hub dataset ``repo`` into ``target`` (the cache), keeping it only if its
    sha256 is ``sha256``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    repo = repo or Settings.from_env().cifar10_repo
    target = target or cache_root() / 'datasets' / ARCHIVE_NAME
    try:
        downloaded = Path(hf_hub_download(repo, ARCHIVE_NAME, repo_type='dataset', revision=revision, token=False))
    except LocalEntryNotFoundError:
        raise DatasetMissing(_missing(f'offline (HF_HUB_OFFLINE) or the Hub unreachable, so {repo} could not be '
                                      'fetched')) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise DatasetMissing(_missing(f'the Hub dataset {repo} could not be fetched ({type(e).__name__})')) from None
    found = sha256_of(downloaded)
    if found != sha256:
        downloaded.unlink(missing_ok=True)
        raise DatasetMissing(_missing(f'{repo}/{ARCHIVE_NAME} has sha256 {found[:16]}…, not {sha256[:16]}… '
                                      '(a different or damaged file; it was not kept)'))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f'.{target.name}.{os.getpid()}')
    shutil.copyfile(downloaded, staging)
    os.replace(staging, target)  # atomic: a concurrent reader sees no file or the whole file
    return target


def find_cifar10(download: bool = True, sha256: str = SHA256) -> Path:
    """The verified archive (see the module doc); :class:`DatasetMissing` when there is none to be had. An
    explicit ``GQA_LENS_CIFAR10`` that is missing or has another checksum is an error, not skipped."""
    explicit = Settings.from_env().cifar10
    if explicit and not (explicit.is_file() and sha256_of(explicit) == sha256):
        raise DatasetMissing(_missing(f'GQA_LENS_CIFAR10={explicit} is ' + (
            'not a file' if not explicit.is_file() else 'a file with another checksum')))
    wrong = []
    for where, path in _candidates():
        if path.is_file():
            if sha256_of(path) == sha256:
                return path
            wrong.append(where)
    if not download:
        raise DatasetMissing(_missing('no download asked for', wrong))
    try:
        return fetch_cifar10(sha256=sha256)
    except DatasetMissing as e:
        raise DatasetMissing(str(e) + (f'; copies with another checksum were ignored ({", ".join(wrong)})'
                                       if wrong else '')) from None


def _missing(why: str, wrong: Tuple = ()) -> str:
    ignored = f'; copies with another checksum were ignored ({", ".join(wrong)})' if wrong else ''
    return (f'CIFAR-10 ({ARCHIVE_NAME}, sha256 {SHA256[:12]}…) not found: {why}{ignored}. Provide it with '
            f'GQA_LENS_CIFAR10=/path/to/{ARCHIVE_NAME}, or run online once (python -m gqa_core.training.cifar10) '
            f'to fetch it into {cache_root() / "datasets"}')


def push(repo: str) -> str:
    """Upload the verified archive to the Hub dataset ``repo`` (the owner, once; uses your login)."""
    from huggingface_hub import HfApi
    path = find_cifar10(download=False)
    api = HfApi()
    api.create_repo(repo, repo_type='dataset', exist_ok=True)
    return str(api.upload_file(path_or_fileobj=str(path), path_in_repo=ARCHIVE_NAME, repo_id=repo,
                               repo_type='dataset', commit_message='CIFAR-10 as 32 px JPEG ImageFolder archive'))


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--push', metavar='ORG/NAME', help='upload the archive to this Hub dataset repo')
    args = parser.parse_args(argv)
    try:
        print(push(args.push) if args.push else find_cifar10())
    except DatasetMissing as e:
        raise SystemExit(str(e)) from None


if __name__ == '__main__':
    main()
