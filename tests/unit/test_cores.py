"""reactor.cores.parse_cores: syntax, ordering, and the affinity check."""
import os

import pytest

from reactor.cores import parse_cores

ALL = set(range(16))


@pytest.mark.parametrize("spec, expected", [
    ("0-3", [0, 1, 2, 3]),
    ("0,2,5", [0, 2, 5]),
    ("1-2,7", [1, 2, 7]),
    ("7,1-2", [1, 2, 7]),
    ("3,3,2-3", [2, 3]),
    (" 4 ", [4]),
    ("5-5", [5]),
])
def test_valid_specs_are_sorted_and_unique(spec, expected):
    """Good specs give a sorted, duplicate-free list."""
    assert parse_cores(spec, ALL) == expected


@pytest.mark.parametrize("spec, needle", [
    ("", "empty"),
    ("   ", "empty"),
    ("0,,1", "empty item"),
    ("1,", "empty item"),
    ("a", "bad item"),
    ("1-", "bad item"),
    ("-1", "bad item"),
    ("1-2-3", "bad item"),
    ("0x1", "bad item"),
    ("3-1", "descending"),
    ("0-99999999999", "implausibly large"),
])
def test_bad_specs_raise_clear_messages(spec, needle):
    """Bad syntax, empty lists and descending ranges are refused by name."""
    with pytest.raises(ValueError, match=needle):
        parse_cores(spec, ALL)


def test_core_outside_allowed_set_is_refused():
    """A core we may not run on is named in the error."""
    with pytest.raises(ValueError, match=r"core\(s\) 4,9-10 not available"):
        parse_cores("0-4,9-10", {0, 1, 2, 3})


def test_default_allowed_is_process_affinity():
    """Without an explicit set, the process affinity mask is the limit."""
    mine = sorted(os.sched_getaffinity(0))
    assert parse_cores(",".join(map(str, mine))) == mine
    with pytest.raises(ValueError, match="not available"):
        parse_cores(str(max(mine) + 1000))
