"""The interpreter's bounds checks (tests/interpret_bounds.py) catch what they are for: an interpreted kernel that
loads or stores outside its tensors fails its launch, while masked accesses at the edge pass."""

from __future__ import annotations

import os

import pytest
import torch

from . import interpret_bounds

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the Triton interpreter")

FAR = 1 << 22  # elements: 16 MB past the tensors, outside every other argument too (an access that happens to land
# inside another argument of the launch passes: the checks know the launch's storages, not which pointer is whose)


def test_out_of_bounds_access_fails_the_launch():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_shifted(x_ptr, y_ptr, n, LOAD_AT: tl.constexpr, STORE_AT: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + LOAD_AT + o, mask=LOAD_AT + o < n, other=-1.0)
        tl.store(y_ptr + STORE_AT + o, v, mask=o < n + STORE_AT)

    assert interpret_bounds.install()  # (conftest installed it already: installing twice is a no-op)
    x, y = torch.arange(8, dtype=torch.float32), torch.empty(8)
    copy_shifted[(1,)](x, y, 8, LOAD_AT=0, STORE_AT=0, BLOCK=8)  # exactly in bounds
    assert torch.equal(y, x)
    copy_shifted[(1,)](x, y, 8, LOAD_AT=3, STORE_AT=0, BLOCK=16)  # loads past the end, masked; stores masked
    assert torch.equal(y, torch.cat([x[3:], torch.full((3,), -1.0)]))
    with pytest.raises(Exception, match="copy_shifted: load of 8 lane"):
        copy_shifted[(1,)](x, y, FAR + 8, LOAD_AT=FAR, STORE_AT=0, BLOCK=8)  # the mask lets far lanes through
    with pytest.raises(Exception, match="copy_shifted: store of 8 lane"):
        copy_shifted[(1,)](x, y, 8, LOAD_AT=0, STORE_AT=FAR, BLOCK=8)
    assert torch.equal(y, torch.cat([x[3:], torch.full((3,), -1.0)]))  # the failed launches wrote nothing
