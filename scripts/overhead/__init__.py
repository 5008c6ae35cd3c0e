"""The parts of ``scripts/bench_overhead.py``, the overhead benchmark's entry point (which documents what is measured).

Not part of the ``orthoreg`` package: the script imports these modules as ``overhead.*`` because Python puts the
script's own folder (``scripts/``) first on ``sys.path``.
"""
