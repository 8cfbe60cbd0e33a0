"""Fast double backward: operations whose torch double backward is slow get one of their own.

:func:`~.fastdouble.fast_double_backward` is the context in which a Landscape builds its graph; it routes
convolutions (:mod:`.convdouble`), layer norm and GELU (:mod:`.normdouble`) to formulas made of standard
kernels, and scaled-dot-product attention (:mod:`.attndouble`, :mod:`.attnkernels`) to torch's fused kernel
with a double backward that recomputes the attention probabilities in tiles instead of keeping them.
"""
