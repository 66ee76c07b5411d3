import os

# The Triton interpreter must be chosen before any @triton.jit function exists.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
