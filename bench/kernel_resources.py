"""Registers, spills and shared memory of every Triton kernel, compiled ahead of time for sm_80 / sm_89 / sm_90 on
a machine without a GPU (Triton's bundled ptxas and cuobjdump; see megasynth/kernels/aot.py for how).

    python bench/kernel_resources.py                 # the full matrix, Markdown table on stdout
    python bench/kernel_resources.py --quick         # the reduced matrix the test suite checks
    python bench/kernel_resources.py --arch 90 --kernels flash_attention --output table.md

Exits 1 if any launch would fail on its architecture (a compile error, or shared memory over
megasynth.kernels._launch.MAX_SHARED_BYTES), 2 if the installed Triton cannot compile for NVIDIA GPUs here.
Spilling kernels are marked in bold in the spills column. Runs without TRITON_INTERPRET (it re-executes itself
without it if set).
"""

from __future__ import annotations

import sys

from megasynth.kernels.aot import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], script=__file__))
