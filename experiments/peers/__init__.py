"""Workers of the peer harness (`experiments/bench_peers.py`), one module per side; each runs
in its own process and virtualenv. Only `mbjax_side` imports mbjax."""
