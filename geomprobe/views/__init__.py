"""Views of the landscape: the loss along directions, on planes, between checkpoints and along a trajectory.

* :func:`line` — ``L(theta + t u)`` along ``"top"``/``"bottom"`` eigenvectors, the ``"gradient"``, the
  optimizer's last ``"update"``, a filter-normalized ``"random"`` direction or a given tensor, beside the
  quadratic model from ``gᵀu`` and ``uᵀHu``;
* :func:`plane` — the same on a grid spanned by two directions;
* :func:`interpolate` — the loss on straight lines between parameter sets (Goodfellow et al. 2015);
* :func:`trajectory` — the PCA plane of a trajectory with the path projected onto it (Li et al. 2018).

Each runs forward passes on a Landscape's probe batches under its state guard, never writing the model's
parameters (:mod:`geomprobe.engine.evaluate`), and states its cost in forward passes and HVPs. Inside a
:class:`~geomprobe.GeometryProbe` the ``view_line`` and ``view_plane`` entries measure them at each probe.
See docs/views.md.
"""

from .directions import filter_normalize, parameter_vector, resolve_direction
from .entries import view_line, view_plane
from .paths import interpolate, pca_plane, trajectory
from .surface import line, plane

__all__ = ["line", "plane", "interpolate", "trajectory", "pca_plane", "resolve_direction", "filter_normalize",
           "parameter_vector", "view_line", "view_plane"]
