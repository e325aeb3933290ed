"""Which of torch's CPU kernels a run uses, for the tests that torch itself cannot run otherwise
(CI runs the tests marked ``numerics`` again with ``ATEN_CPU_CAPABILITY`` set; these are not among
them, but a whole suite run that way should say why they do not run rather than fail)."""

from __future__ import annotations

import os

import pytest

_CAPABILITY = os.environ.get("ATEN_CPU_CAPABILITY")

#: under ``ATEN_CPU_CAPABILITY=default`` torch 2.14's inductor writes vectorized C++ that does not
#: compile ("'at::vec' has not been declared")
needs_inductor = pytest.mark.skipif(
    _CAPABILITY == "default",
    reason="torch's inductor writes C++ that does not compile under ATEN_CPU_CAPABILITY=default",
)

#: with ``ATEN_CPU_CAPABILITY`` below what the CPU has, torch 2.14's bfloat16 matrix products still
#: take the CPU's AVX-512 path and stop ("pack_vnni2 is only supported when avx512 is supported")
needs_bfloat16_kernels = pytest.mark.skipif(
    _CAPABILITY is not None, reason="torch's bfloat16 kernels fail with ATEN_CPU_CAPABILITY set below the CPU's"
)
