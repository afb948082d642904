"""Suite-wide fixtures: the background loss soak (see loss_soak.py)."""

from __future__ import annotations

import pytest

SOAK_TEST = "test_twenty_percent_loss_on_every_link_gives_no_false_death"


@pytest.fixture(scope="session")
def loss_soak():
    """The running soak; started by whichever test asks first, closed at the end."""
    import netns
    from loss_soak import LossSoak

    netns.require_lab(pytest, need_loss=True)
    netns.install_sigterm_cleanup()
    soak = LossSoak()
    try:
        soak.start()
    except BaseException:
        soak.close(failed=True)
        raise
    yield soak
    soak.close()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """When the soak's verdict is selected, move it to the end of the run and let
    the first simulator test start the soak: the simulators are deterministic and
    use one core, so the soak's idle agents overlap them instead of adding two
    minutes of waiting to the suite."""
    verdict = next((item for item in items if item.name == SOAK_TEST), None)
    if verdict is None:
        return
    items.remove(verdict)
    items.append(verdict)
    starter = next((item for item in items if item.path.name.startswith("test_sim_")), None)
    if starter is not None:
        starter.fixturenames.insert(0, "loss_soak")
