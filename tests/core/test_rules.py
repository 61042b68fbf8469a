"""The one mechanism for untrusted values: exact types, bounds as stated, and messages that say the rule."""
import math

import pytest

from gqa_core.core.rules import BOOLEAN, check, check_fields, integer, number, one_of, optional, text


def test_rules_accept_exactly_what_they_say():
    assert integer(1, 64)(64) and not integer(1, 64)(65) and not integer(1, 64)(True) and not integer(1, 64)(2.0)
    assert number(0, 1)(1) and number(0, 1)(0.5) and not number(0, 1)(math.nan) and not number(0, 1)(math.inf)
    assert not number(0, 1, high_open=True)(1) and number(0, 1, high_open=True)(0.999)
    assert BOOLEAN(False) and not BOOLEAN(0) and not BOOLEAN('true')
    assert one_of('', 'token')('') and not one_of(3)(3.0) and not one_of(1)(True)
    assert optional(integer(0, 2))(None) and not optional(integer(0, 2))(3)
    assert text(5)('hello') and not text(5)('') and not text(5)('toolong') and not text(5)('a\nb')
    assert (integer(1, 64).says, number(0.25, 16).says, optional(number(0, 10)).says) == (
        'an int 1..64', 'a number 0.25..16', 'null or a number 0..10')


def test_refusals_name_the_field_and_the_rule():
    with pytest.raises(ValueError, match=r'^backbone_args\.depth must be an int 1\.\.64$'):
        check_fields('backbone_args', {'depth': 65}, {'depth': integer(1, 64)})
    with pytest.raises(ValueError, match="'checkpoint_path' is not an allowed key"):
        check_fields('backbone_args', {'checkpoint_path': '/etc'}, {'depth': integer(1, 64)})
    with pytest.raises(KeyError, match='must be an object'):
        check_fields('grouping', [1], {}, error=KeyError)
    assert check('x', 3, integer(0, 3)) == 3
