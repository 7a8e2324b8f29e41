"""The device's gather of a streamed batch's rows from host memory it can read (a view made by
:func:`mlpgrid.data.host_view.device_view`): a Triton kernel of a few programs.

A read across the bus keeps its thread waiting about a microsecond, and a kernel holds the
multiprocessors its blocks sit on for as long as they wait: ``torch.index_select`` launches
blocks on all of them, and the training step beside it stalls. A few programs with many bytes
in flight each still fill the bus, and leave the rest of the device to the step. Measured on
the H200 machine, 16384 random rows of 12 KiB (64x64x3 images) beside B-6/Wi-256's compiled
step at batch 16384 on a batch already on the GPU (1.84M images/s alone):

=================================  =================  ====================
gather                             rows/s, alone      the step beside it
=================================  =================  ====================
``index_select`` (uint8 or int64)  4.04M              69.9%
8 programs of 4 warps              2.73M              90.6%
16 programs of 4 warps             4.07M              90.2%
32 / 64 / 132 programs             3.88M / 3.82M /    88.7% / 86.7% /
                                   3.88M              71.3%
=================================  =================  ====================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PROGRAMS, WARPS = 16, 4  # the measurement above: as fast as index_select alone, 90% of the step beside it
CHUNK = 4096  # elements a program moves at once: one 64x64x3 image (3072 int32) in one go


@triton.jit
def _gather_rows(source, rows, out, n_rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """``out[r] = source[rows[r]]`` for rows of ``WIDTH`` elements; program p copies rows p,
    p + programs, ..."""
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        first = tl.load(rows + r).to(tl.int64) * WIDTH
        target = tl.cast(r, tl.int64) * WIDTH
        for start in tl.static_range(0, WIDTH, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < WIDTH
            tl.store(out + target + offsets, tl.load(source + first + offsets, mask=inside), mask=inside)


def gather_rows(source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``source[rows]`` for a C-contiguous uint8 ``source`` and int64 ``rows`` on its device."""
    flat = source.reshape(len(source), -1)
    width = flat.shape[1]
    # The widest element dividing a row: fewer, wider reads across the bus.
    element = torch.int32 if width % 4 == 0 else torch.int16 if width % 2 == 0 else torch.uint8
    words = flat.view(element)
    out = torch.empty((len(rows), words.shape[1]), dtype=element, device=source.device)
    if len(rows):
        block = min(CHUNK, triton.next_power_of_2(words.shape[1]))
        _gather_rows[(min(PROGRAMS, len(rows)),)](words, rows, out, len(rows), WIDTH=words.shape[1], BLOCK=block,
                                                  num_warps=WARPS)  # fmt: skip
    return out.view(torch.uint8).view(len(rows), *source.shape[1:])
