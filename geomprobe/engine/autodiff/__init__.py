"""Fast double backward: operations whose torch double backward is slow get one of their own.

:func:`~.fastdouble.fast_double_backward` is the context in which a Landscape builds its graph; it routes
convolutions (:mod:`.convdouble`), layer norm and GELU (:mod:`.normdouble`) to formulas made of standard
kernels.
"""
