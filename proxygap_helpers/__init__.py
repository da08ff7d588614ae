"""proxygap: do SAE reconstruction proxies (R2, cosine) agree with behaviour as models grow?

The thin, tested library that the notebooks in ``notebooks/`` call. One module per concern:
``params`` (validated YAML), ``data`` (text, tokens), ``models`` (the model pair and the one loader),
``extract`` and ``activations`` (activation stores), ``train`` with ``engine`` and ``sparse_step`` (the fast
TopK SAE trainer) and ``training`` (what both trainers share, and SAELens' trainer), ``metrics`` and
``evaluate`` (every metric of the study, SWD included), ``stats``, ``leaderboard`` and ``claims``
(aggregate), ``plots``, ``report`` and ``publish`` (HTML), ``grid``, ``executors`` and ``cli`` (the runner),
``layout`` (where every result file lives), ``provenance`` and ``files`` (what produced a result, crash-safe
writes). Imports go one way (tests/test_layering.py): cli -> grid, executors, plan -> extract, train,
evaluate, aggregate, publish -> the science and analysis modules -> params, files, layout, provenance.
"""

__version__ = "0.1.0"
