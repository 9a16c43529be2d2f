"""The codes of ``fastlangevin.ops.codes`` as ``tl.constexpr`` globals, the only globals a jitted function may read.

Generated from that module (nothing is declared twice); kernels write ``codes.RELU``, ``codes.MALA``,
``codes.PRIOR_DIAGONAL`` after ``from fastlangevin.ops.triton import codes``.
"""

import triton.language as tl

from fastlangevin.ops import codes as _codes

globals().update({name: tl.constexpr(value) for name, value in vars(_codes).items()
                  if name.isupper() and isinstance(value, int)})
