"""Hypothesis settings for the property tests: short in CI, long on demand.

VNVMED_HYPOTHESIS=long (e.g. ``VNVMED_HYPOTHESIS=long pytest tests/fuzz``) runs 20x
the examples.  No example database is written into the checkout.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("VNVMED_HYPOTHESIS", "ci"))
