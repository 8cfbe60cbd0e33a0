"""Pure numerical kernels: functions of a symmetric matvec, with no knowledge of models.

A *matvec* maps a flat vector ``(d,)`` to ``H v`` and a block ``(k, d)`` to the row-wise products. In tests
it is a dense matrix, in use :meth:`geomprobe.Landscape.hvp`. Each module holds one family:
:mod:`.vectors` (random vectors, the matvec type), :mod:`.lanczos` (extreme eigenvalues with residual
bounds), :mod:`.certify` (that the extremes found are the extremes), :mod:`.restarted_lanczos` (the same in bounded memory), :mod:`.block_lanczos`, :mod:`.slq` (spectral density), :mod:`.traces` (Hutchinson, Hutch++,
deflated), :mod:`.diagonal` (Bekas) and :mod:`.exact` (columns, diagonal entries, dense matrices).
"""

from .block_lanczos import block_lanczos
from .diagonal import bekas_diagonal
from .exact import dense_matrix, exact_diagonal, hessian_columns
from .lanczos import LanczosMemory, LanczosResult, gap_bounds, lanczos, lanczos_memory_bytes
from .restarted_lanczos import restarted_lanczos
from .slq import SLQResult, slq, slq_density
from .traces import TraceEstimate, deflated_trace, hutchinson_trace, hutchpp_trace
from .vectors import Matvec, default_generator, device_generator, gaussian, rademacher

__all__ = [
    "Matvec", "default_generator", "device_generator", "gaussian", "rademacher",
    "LanczosResult", "lanczos", "gap_bounds", "restarted_lanczos", "LanczosMemory", "lanczos_memory_bytes",
    "block_lanczos",
    "SLQResult", "slq", "slq_density",
    "TraceEstimate", "hutchinson_trace", "hutchpp_trace", "deflated_trace",
    "bekas_diagonal", "hessian_columns", "exact_diagonal", "dense_matrix",
]
