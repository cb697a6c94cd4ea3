"""Independent oracles the tests compare q2lab against (llama.cpp, its own tools), and the marker
for tests that need one."""

from __future__ import annotations

import pytest

from q2lab.quant.ggml import llamacpp

needs_llamacpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason="llama-cpp-python is not installed (pip install 'q2lab[llamacpp]'): no llama.cpp oracle",
)
