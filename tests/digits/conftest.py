"""One torch thread for these tests: tiny matmuls gain nothing from a second thread, and on
a machine shared with other test sessions a second OpenMP thread that is descheduled
stalls every op (measured: 9 s alone, 260 s with 2 threads under load, 44 s with 1)."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
