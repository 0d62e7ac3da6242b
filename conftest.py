"""Shared test setup: tiny models run fastest on one thread (100x faster than two on a busy 2-core machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
