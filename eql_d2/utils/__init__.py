"""Small helpers every layer of eql_d2 may import: atomic file writes (:mod:`.io`), the
all-reduce of statistics (:mod:`.comm`), the LVIS rare / common / frequent grouping
(:mod:`.groups`) and the base class of statistics kept in checkpoints (:mod:`.statistics`).

Pure Python and PyTorch: nothing here imports detectron2, so :mod:`eql_d2.losses` can use it.
"""
