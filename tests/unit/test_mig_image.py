"""migration/nvmeimage.py and nvme.state.plain: the fast paths equal the plain ones."""
from __future__ import annotations

import array
import dataclasses
import random

from migration.nvmeimage import doorbell_words
from nvme.admin.features import FeatureState
from nvme.admin.logs import ErrorEntry, IoStats
from nvme.config import ControllerConfig
from nvme.state import CqState, SqState, plain


def test_doorbell_words_finds_every_non_zero_word() -> None:
    rng = random.Random(7)
    for nwords in (3072, 1000, 16, 1):
        for density in (0, 1, 5, 40, nwords):
            a = array.array("I", [0] * nwords)
            for _ in range(density):
                a[rng.randrange(nwords)] = rng.choice((1, 0xFF000000, 0x10000, rng.getrandbits(32) | 1))
            words = memoryview(a)
            assert doorbell_words(words) == [[i, a[i]] for i in range(nwords) if a[i]]


def test_plain_is_asdict_for_the_snapshot_records() -> None:
    objs = [SqState(3, 2, 0x10000, 33, head=5, tail=7, broken=True), CqState(2, 0x20000, 33, 4, True, tail=9),
            FeatureState(coalescing_exempt=[1, 5]), IoStats(bytes_read=9), ControllerConfig(serial="S1"),
            ErrorEntry(1, 2, 3, 4, 5, 6, 7)]
    for o in objs:
        d = plain(o)
        assert d == dataclasses.asdict(o)
    fs = FeatureState(coalescing_exempt=[1])
    d = plain(fs)
    d["coalescing_exempt"].append(2)              # a copy, as asdict gives
    assert fs.coalescing_exempt == [1]
