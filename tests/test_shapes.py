import math

import pytest

from mpocompress.errors import MPOCompressError
from mpocompress.tensors import check_modes, factorize, parse_modes, parse_shape_spec


@pytest.mark.parametrize(
    "n, parts, expected",
    [(784, 4, (4, 7, 7, 4)), (4096, 4, (8, 8, 8, 8)), (256, 4, (4, 4, 4, 4)), (84, 4, (2, 3, 7, 2)), (1, 3, (1, 1, 1))],
)
def test_balanced_factorization(n, parts, expected):
    assert factorize(n, parts) == expected


@pytest.mark.parametrize("n", [10, 7, 1009, 25088, 120, 4096, 2**12 * 3])
@pytest.mark.parametrize("parts", [1, 2, 4, 5])
def test_factorization_multiplies_back_and_uses_one_for_few_factors(n, parts):
    modes = factorize(n, parts)
    assert len(modes) == parts and math.prod(modes) == n and min(modes) >= 1
    # no more balanced split exists: the largest mode is minimal over all splits into `parts`
    if n == 10 and parts == 4:
        assert sorted(modes) == [1, 1, 2, 5]
    if n == 1009 and parts >= 2:  # a prime: one mode carries it, the rest are 1
        assert sorted(modes)[-1] == 1009 and modes.count(1) == parts - 1


def test_mountain_order_puts_large_modes_in_the_middle():
    modes = factorize(4096, 5)
    assert max(modes[0], modes[-1]) <= min(modes[1:-1])


def test_parse_modes_and_shape_spec():
    assert parse_modes("4x7x7x4") == (4, 7, 7, 4)
    assert parse_modes("4,7,7,4") == (4, 7, 7, 4)
    assert parse_shape_spec("4x7x7x4:4x4x4x4") == ((4, 7, 7, 4), (4, 4, 4, 4))


@pytest.mark.parametrize("text", ["", "4xx4", "4xax4", "4x0x4", "4x-1", "4.5x2"])
def test_parse_modes_rejects_bad_text(text):
    with pytest.raises(MPOCompressError):
        parse_modes(text)


@pytest.mark.parametrize("text", ["4x7x7x4", "4x7x7x4:4x4x4", "a:b", "4:4:4"])
def test_parse_shape_spec_rejects_bad_specs(text):
    with pytest.raises(MPOCompressError):
        parse_shape_spec(text)


def test_check_modes_proposes_a_split():
    with pytest.raises(MPOCompressError, match=r"multiply to 196, not 784; try 4x7x28|try \d+x\d+x\d+"):
        check_modes((4, 7, 7), 784, "input modes of fc1")
    with pytest.raises(MPOCompressError) as e:
        check_modes((4, 7, 7, 5), 784, "input modes of fc1")
    assert "try 4x7x7x4" in str(e.value)
