"""Game bridges: the BonkLink TCP protocol (codec, client, reference game server, launcher,
state→learner shim) and the ResearchPlugin shared-memory bridge.

Sockets, threads and files live only here (and in the Sebulba loop, `mbjax.train.sebulba`
and `mbjax.train.sebulba_actor`); everything a learner computes from bridge data is pure
NumPy/JAX elsewhere.
"""
