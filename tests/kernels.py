"""Which of torch's CPU kernels a run uses, for the tests that torch itself cannot run otherwise."""

from __future__ import annotations

import os

import pytest

#: ``ATEN_CPU_CAPABILITY=default`` (torch's portable kernels, one of the roundings CI tests under):
#: torch 2.14's inductor then writes vectorized C++ that does not compile ("'at::vec' has not been
#: declared"), and bfloat16 matrix products call AVX-512 packing that the setting turns off
#: ("pack_vnni2 is only supported when avx512 is supported") on CPUs that have AVX-512
needs_native_kernels = pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY") == "default",
    reason="torch's inductor and bfloat16 kernels fail under ATEN_CPU_CAPABILITY=default",
)
