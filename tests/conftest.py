import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory):
    """An ``Emulator`` (tests/cuda_emulation/emulator.py): csrc/cuda's launchers run on the CPU; skips without g++."""
    from cuda_emulation.emulator import Emulator, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    return Emulator(tmp_path_factory.mktemp("cuda_emulation"))
