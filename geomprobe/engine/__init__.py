"""The curvature engine: a model, its loss and fixed probe batches in; loss, gradient and HVPs out.

:class:`~geomprobe.engine.landscape.Landscape` builds the first-order graph once and answers ``hvp`` for as
long as it lives; beside it live batch handling (:mod:`.batches`, :mod:`.probedata`), flat vectors and
parameter blocks (:mod:`.paramspace`), the state guard (:mod:`.state`), per-example gradients
(:mod:`.persample`), the data-parallel reducer (:mod:`.distributed`), FSDP2-sharded models
(:mod:`.sharded`, :mod:`.sharded_landscape`) and the fast double backward
(:mod:`.autodiff`).
"""

from .landscape import Landscape, unwrap_model
from .paramspace import Block, ParamSpace
from .sharded_landscape import ShardedLandscape
from .state import frozen

__all__ = ["Landscape", "ShardedLandscape", "unwrap_model", "Block", "ParamSpace", "frozen"]
