"""Rules for untrusted values: the one way GQA Lens checks data it did not make.

A :class:`Rule` is a test and the words for what it accepts, so every refusal reads ``<field> must be <words>``
-- a policy's options, a ``config.json`` (ours, timm's, transformers'), a conversion record. Types are exact
(``True`` is not an int, ``1.0`` is not an int, NaN is not a number), so a rule accepts only what it says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Type

__all__ = ['Rule', 'integer', 'number', 'BOOLEAN', 'one_of', 'optional', 'list_of', 'either', 'text', 'check',
           'check_fields']


@dataclass(frozen=True)
class Rule:
    """``accepts(value)`` and ``says``: what it accepts, completing "... must be ___"."""
    accepts: Callable[[Any], bool]
    says: str

    def __call__(self, value: Any) -> bool:
        return bool(self.accepts(value))


def integer(low: int, high: int, says: Optional[str] = None) -> Rule:
    """An ``int`` (not a bool) in ``low..high``."""
    return Rule(lambda v: type(v) is int and low <= v <= high, says or f'an int {low}..{high}')


def number(low: float, high: float, says: Optional[str] = None, high_open: bool = False) -> Rule:
    """A finite int or float in ``low..high`` (``high`` itself excluded with ``high_open``)."""
    def accepts(v: Any) -> bool:
        return (type(v) in (int, float) and math.isfinite(v) and low <= v
                and (v < high if high_open else v <= high))
    return Rule(accepts, says or f'a number {low}..{high}' + (f' (not {high})' if high_open else ''))


BOOLEAN = Rule(lambda v: type(v) is bool, 'true or false')


def one_of(*choices: Any, says: Optional[str] = None) -> Rule:
    """One of ``choices``, of the same type (``1`` is not ``True``)."""
    return Rule(lambda v: any(v is c or (type(v) is type(c) and v == c) for c in choices),
                says or ' or '.join(str(c) for c in choices))


def list_of(rule: Rule, low: int, high: int) -> Rule:
    """A ``list`` of ``low..high`` items, each accepted by ``rule``."""
    return Rule(lambda v: type(v) is list and low <= len(v) <= high and all(rule(x) for x in v),
                f'a list of {low}..{high} items, each {rule.says}')


def either(first: Rule, second: Rule) -> Rule:
    """What ``first`` or ``second`` accepts."""
    return Rule(lambda v: first(v) or second(v), f'{first.says}, or {second.says}')


def optional(rule: Rule, says: Optional[str] = None) -> Rule:
    """``None`` or what ``rule`` accepts."""
    return Rule(lambda v: v is None or rule(v), says or f'null or {rule.says}')


def text(limit: int, says: Optional[str] = None) -> Rule:
    """A non-empty printable string of at most ``limit`` characters."""
    return Rule(lambda v: isinstance(v, str) and 0 < len(v) <= limit and v.isprintable(),
                says or f'at most {limit} printable characters')


def check(name: str, value: Any, rule: Rule, error: Type[Exception] = ValueError) -> Any:
    """``value`` when ``rule`` accepts it, else ``error('<name> must be <rule.says>')``."""
    if not rule(value):
        raise error(f'{name} must be {rule.says}')
    return value


def check_fields(where: str, values: Any, rules: Mapping[str, Rule],
                 error: Type[Exception] = ValueError) -> Dict[str, Any]:
    """An object whose every key is in ``rules`` and whose every value its rule accepts (a copy)."""
    if not isinstance(values, dict):
        raise error(f'{where} must be an object, got {type(values).__name__}')
    for key, value in values.items():
        if key not in rules:
            shown = key if isinstance(key, str) and len(key) <= 40 else '(a long key)'
            raise error(f'{where}: {shown!r} is not an allowed key (allowed: {", ".join(sorted(rules))})')
        check(f'{where}.{key}', value, rules[key], error)
    return dict(values)
