"""Command-line fronts of the ``zoo eval | scaling | plan | consolidate`` commands (entry points in pyproject.toml).

Each front holds its parser only and imports neither torch nor Lightning at module level, so ``--help`` and every
argument error come back at once; it imports the library module that does the work (``lm.evals``, ``lm.scaling``,
``lm.parallel``) inside ``main``, once the arguments are good. No library module imports a front.
"""
