"""ops.cores.parse_cores: syntax, ordering, and the affinity check."""
import os

import pytest

from ops.cores import expand_cores, format_cores, parse_cores

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


def test_expand_cores_is_the_syntax_part_in_written_order():
    """Syntax only: order and repeats kept, nothing checked against the machine."""
    assert expand_cores("7,1-2,2") == [7, 1, 2, 2]
    assert expand_cores("100000") == [100000]
    with pytest.raises(ValueError, match="descending"):
        expand_cores("3-1")


def test_format_cores_round_trips():
    assert format_cores([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert format_cores([]) == ""
    assert parse_cores(format_cores([0, 2, 3, 9]), ALL) == [0, 2, 3, 9]


def test_config_uses_the_same_syntax_and_refuses_repeats():
    """ops.config parses --cores / cores = "..." with this module's syntax rules."""
    from ops import config as C
    assert C.parse_cores(" 1-2 , 7") == [1, 2, 7]
    with pytest.raises(ValueError, match="empty item"):
        C.parse_cores("1,")
    with pytest.raises(ValueError, match="twice"):
        C.parse_cores("3,2-3")
    with pytest.raises(ValueError, match="out of range"):
        C.parse_cores("4096")
    assert C.parse_cores([3, 1]) == [1, 3]
