"""Bounds checks for Triton kernels run by the interpreter (the CPU CI).

The interpreter reads and writes whatever lies at an address: an out-of-bounds access raises nothing there, where a
GPU would read garbage or fault. ``install()`` wraps the interpreter so that every load and store of a launch must
fall, lane by active lane, inside the storage of one of that launch's tensor arguments; otherwise the launch fails
with an AssertionError naming the kernel. conftest.py installs it whenever kernels are interpreted. It reaches into
the interpreter's internals (``GridExecutor._init_args_hst``, ``InterpreterBuilder.create_masked_load/store``):
where a Triton version lacks them, ``install()`` returns False and the suite runs unchecked.
"""

from __future__ import annotations

import numpy as np

_ranges: list[tuple[int, int, tuple, str]] = []  # (start, end, shape, dtype) of the current launch's storages
_kernel = [None]


def _record(args) -> None:
    _ranges.clear()
    for a in args:
        if hasattr(a, "untyped_storage"):
            s = a.untyped_storage()
            _ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes(), tuple(a.shape), str(a.dtype)))


def _check(ptrs, mask, itemsize: int, what: str) -> None:
    # the mask's array may be another integer type than bool (an int1 tensor from arithmetic), or broadcastable
    active = np.broadcast_to(mask.data.astype(bool), ptrs.data.shape) if mask is not None else slice(None)
    addrs = ptrs.data[active].ravel()
    if addrs.size == 0:
        return
    inside = np.zeros(addrs.shape, bool)
    for start, end, _, _ in _ranges:
        inside |= (addrs >= start) & (addrs + itemsize <= end)
    if not inside.all():
        name = getattr(_kernel[0], "__name__", _kernel[0])
        args = ", ".join(f"{d}{list(s)} at 0x{a:x}+{b - a}" for a, b, s, d in _ranges)
        raise AssertionError(
            f"kernel {name}: {what} of {int((~inside).sum())} lane(s) outside its tensor arguments (first at "
            f"0x{int(addrs[~inside][0]):x}; arguments: {args})"
        )


def install() -> bool:
    try:
        import triton.runtime.interpreter as interp

        grid, builder, np_dtype = interp.GridExecutor, interp.InterpreterBuilder, interp._get_np_dtype
        init_args, load, store = grid._init_args_hst, builder.create_masked_load, builder.create_masked_store
    except (ImportError, AttributeError):
        return False
    if getattr(init_args, "_fastdebias_bounds", False):
        return True

    def init_args_checked(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _record(list(args_hst) + list(kwargs_hst.values()))
        _kernel[0] = getattr(self, "fn", None)
        return args_hst, kwargs_hst

    def load_checked(self, ptrs, mask, other, *args, **kwargs):
        _check(ptrs, mask, np.dtype(np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, *args, **kwargs)

    def store_checked(self, ptrs, value, mask, *args, **kwargs):
        _check(ptrs, mask, np.dtype(np_dtype(ptrs.get_element_ty())).itemsize, "store")
        return store(self, ptrs, value, mask, *args, **kwargs)

    init_args_checked._fastdebias_bounds = True
    grid._init_args_hst = init_args_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    return True
