"""Small helpers: FLOP rules for the deformable convs (:mod:`.flops`) and
the choice check of settings (:mod:`.misc`).

Checkpoints are read in :mod:`mmdet_dyhead.checkpoint`.
"""
