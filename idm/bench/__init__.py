"""Benchmarks behind ``idm bench``: one module per benchmark (``memory``, ...), each defining
``add_arguments(parser)`` and ``run_cli(args) -> int``; :mod:`idm.bench.accounting` measures memory."""
