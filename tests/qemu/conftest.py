"""Real-guest tests: provision QEMU and the guest once per session, only when needed.

Provisioning (tests/qemu/provision: apt, debootstrap, image build; ~75 s cold, under a
second cached) runs after collection, before the first test, and only when a selected
test carries the ``qemu`` marker: ``pytest --collect-only`` and ``-m 'not qemu'`` never
provision.  It runs outside any test so a cold start is not charged to one test's
timeout.  Tests get the result through the session fixture ``guest_env``:

* provisioned: the GuestEnv (paths of QEMU, kernel, images);
* not possible and ``VNVMED_QEMU_REQUIRED=1`` (scripts/test, .ci/run): every qemu test
  FAILS with the reason, so CI cannot go green with the real guest never booted;
* not possible otherwise: every qemu test is skipped with the reason.
"""
from __future__ import annotations

import pytest

from tests.qemu import harness


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("qemu") for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("tests/qemu: provisioning QEMU and the guest (cached after the first run)")
    try:
        env = harness.provision()
    except harness.ProvisionError as exc:
        if reporter is not None:
            reporter.write_line(f"tests/qemu: provisioning FAILED: {exc}", red=True)
    else:
        if reporter is not None:
            reporter.write_line(f"tests/qemu: QEMU {env.qemu_version}, guest kernel {env.kernel_release}")


@pytest.fixture(scope="session")
def guest_env() -> harness.GuestEnv:
    """The provisioned QEMU + guest; skip, or fail under VNVMED_QEMU_REQUIRED=1, if impossible."""
    try:
        return harness.provision()
    except harness.ProvisionError as exc:
        reason = str(exc)
    if harness.qemu_required():
        pytest.fail(f"QEMU guest unavailable and VNVMED_QEMU_REQUIRED=1: {reason}", pytrace=False)
    pytest.skip(f"QEMU guest unavailable: {reason}")


@pytest.fixture(autouse=True)
def _qemu_tests_need_the_guest(request: pytest.FixtureRequest) -> None:
    """Every qemu-marked test depends on guest_env, even one that never names it."""
    if request.node.get_closest_marker("qemu") is not None:
        request.getfixturevalue("guest_env")
