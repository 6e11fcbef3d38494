"""The ``module_path`` classic pyisolate imports in the child; the code lives in ``classic_ext``.

A subdirectory on purpose: classic puts ``module_path``'s grandparent first on the child's
``sys.path``. Here that is ``benchmarks/`` (so ``classic_ext`` imports); ``classic_ext`` itself as
``module_path`` would put the repository root first, where our own ``pyisolate`` would shadow it.
"""
