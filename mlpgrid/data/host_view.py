"""Host memory a CUDA device reads directly.

An array is page-locked and registered with CUDA (``cudaHostRegister``) and handed to PyTorch
through the CUDA array interface as a CUDA tensor whose storage is the host's pages; a gather
on the device (:mod:`mlpgrid.data.row_gather`) then reads its rows across the bus with no CPU
copying them. Measured on the H200 machine with 16384 random 12 KiB rows (64x64x3 images) of a
12 GB array: 4.07M rows/s (50 GB/s, 91% of a pinned host-to-device copy), from RAM and from a
page-cached memory map alike, where 16 CPU threads gathering into pinned memory reach 1.37M.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import numpy as np
import torch

log = logging.getLogger(__name__)

# Registered pages stay locked in RAM for as long as the view lives: arrays larger than this
# part of the host's memory are left to the CPU's gather, which the page cache can evict under.
HOST_SHARE = 0.5
_PORTABLE, _READ_ONLY = 1, 8  # cudaHostRegister flags: every CUDA context sees it; the device only reads

_registered: dict[tuple[int, int], int] = {}  # (address, bytes) -> live views of it
_lock = threading.Lock()


class _CudaArray:
    """``array`` as the CUDA array interface describes device memory: its pointer is valid on
    the device once registered (unified addressing)."""

    def __init__(self, array: np.ndarray):
        self.array = array  # the view's storage: kept alive with it
        self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str,
                                         "data": (array.ctypes.data, False), "strides": None, "version": 3}  # fmt: skip


def host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_view(array: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """``array`` (C-contiguous; RAM or a memory map) as a tensor on the CUDA ``device`` whose reads
    go to host memory; None where it cannot be (logged), and the caller gathers on the CPU."""
    if not array.flags.c_contiguous or array.nbytes == 0:
        return None
    if array.nbytes > HOST_SHARE * host_ram():
        log.info("%.1f GB of images are more than %d%% of host memory: streamed by CPU threads",
                 array.nbytes / 1e9, 100 * HOST_SHARE)  # fmt: skip
        return None
    key = (array.ctypes.data, array.nbytes)
    with _lock:
        if key not in _registered:
            flags = _PORTABLE | (0 if array.flags.writeable else _READ_ONLY)
            with torch.cuda.device(device):
                error = torch.cuda.cudart().cudaHostRegister(key[0], key[1], flags)
            if int(error) != 0:
                log.warning("cudaHostRegister of %.1f GB of images failed (%s): streamed by CPU threads",
                            array.nbytes / 1e9, error)  # fmt: skip
                return None
            _registered[key] = 0
        _registered[key] += 1
    view = torch.as_tensor(_CudaArray(array), device=device)
    weakref.finalize(view, _release, key, device)
    return view


def _release(key: tuple[int, int], device: torch.device) -> None:
    with _lock:
        _registered[key] -= 1
        if _registered[key]:
            return
        del _registered[key]
        torch.cuda.synchronize(device)  # no kernel may still be reading the pages
        torch.cuda.cudart().cudaHostUnregister(key[0])
