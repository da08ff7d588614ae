"""proxygap: do SAE reconstruction proxies (R2, cosine) agree with behaviour as models grow?

The thin, tested library that the notebooks in ``notebooks/`` call. One module per concern:
``params`` (validated YAML), ``data`` (text, tokens), ``models`` (the model pair and the one loader),
``extract`` and ``activations`` (activation stores), ``training`` (TopK SAEs via SAELens), ``metrics``
and ``evaluate`` (every metric of the study, SWD included), ``stats``, ``leaderboard`` and ``claims``
(aggregate), ``plots`` and ``report`` (HTML), ``grid``, ``executors`` and ``cli`` (the runner),
``provenance`` and ``files`` (what produced a result, crash-safe writes).
"""

__version__ = "0.1.0"
