"""Unit tests of the science run tiny models: one intra-op thread is faster than two and immune to
oversubscription when other test processes (Ray workers, servers) share the machine's two cores."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_threaded_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
