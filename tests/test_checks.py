import math

import pytest

from labkit.checks import check_choice, check_int, check_ints, check_optional_int, check_positive, is_int


@pytest.mark.parametrize("bad", [True, False, 0, -3, 1.0, "2", None])
def test_check_int_names_the_argument_and_the_bad_value(bad):
    with pytest.raises(ValueError, match=rf"^count must be an integer >= 1, got {bad!r}$".replace("(", r"\(")):
        check_int("count", bad)


def test_check_int_returns_good_values_and_honours_the_minimum_and_error_type():
    assert check_int("count", 0, minimum=0) == 0
    assert check_optional_int("limit", None) is None
    with pytest.raises(TypeError, match="size must be an integer >= 2"):
        check_int("size", 1, minimum=2, error=TypeError)
    assert not is_int(True) and is_int(7)


def test_check_ints_reads_attributes():
    class Config:
        a, b = 1, 0
    with pytest.raises(ValueError, match="^b must be"):
        check_ints(Config(), ["a", "b"])


@pytest.mark.parametrize("bad", ["1", math.nan, 0, -1.5, math.inf, True])
def test_check_positive_refuses_non_numbers_nan_zero_and_infinity(bad):
    with pytest.raises(ValueError, match="^rate must be a number > 0"):
        check_positive("rate", bad)


def test_check_positive_options_and_check_choice():
    assert check_positive("wait", 0, allow_zero=True) == 0
    assert check_positive("rate", math.inf, allow_inf=True) == math.inf
    assert check_choice("policy", "fcfs", ("fcfs", "sjf")) == "fcfs"
    with pytest.raises(ValueError, match="^unknown policy 'lifo': choose one of fcfs, sjf$"):
        check_choice("policy", "lifo", ("fcfs", "sjf"))
