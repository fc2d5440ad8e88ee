import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny networks on a 2-core machine shared with other jobs (and with the Ray trials the
    # tests start): with 2 OpenMP threads they spin-wait on each other (a 0.5 s supernet
    # forward measured at 47 s under load). Trial processes set their own thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
