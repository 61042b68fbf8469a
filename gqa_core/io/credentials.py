"""Whose Hub token a download may carry.

A public app downloads what strangers name (``hub:ORG/NAME``, ``convert:hf-hub:...``). Left to its default,
huggingface_hub sends the token of whoever runs the server (``HF_TOKEN``, or a saved login): a visitor could
then read the operator's private or gated repos through the app. So a download caused by a visitor carries no
token at all (``token=False``) unless the operator listed the repo in ``GQA_LENS_TOKEN_REPOS``: comma-
separated repo ids or ``ORG/*`` patterns (e.g. ``myorg/*,me/one-model``). Code the operator runs themselves
(scripts, training, the library's default arguments) keeps huggingface_hub's default (``token=None``).
"""
from __future__ import annotations

import fnmatch
from typing import Optional, Sequence, Tuple, Union

from ..core.settings import Settings

__all__ = ['TOKEN_REPOS_ENV', 'token_repos', 'visitor_token']

TOKEN_REPOS_ENV = Settings.variable('token_repos')
Token = Union[bool, str, None]


def token_repos(value: Optional[str] = None) -> Tuple[str, ...]:
    """The operator's patterns, from ``value`` or the environment; blanks dropped."""
    if value is None:
        return Settings.from_env().token_repos
    return tuple(p.strip() for p in value.split(',') if p.strip())


def visitor_token(repo_id: str, allowed: Sequence[str]) -> Token:
    """``None`` (the operator's own token) for a repo the operator allowed, ``False`` (no token) otherwise."""
    repo = repo_id.split('@')[0]
    return None if any(fnmatch.fnmatchcase(repo, pattern) for pattern in allowed) else False
