import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    # Tiny networks on a 2-core machine shared with other jobs: with 2 OpenMP threads they
    # spin-wait on each other (a 0.5 s supernet forward measured at 47 s under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
