"""Learning algorithms as pure functions: `init`, `loss`, `update` over pytrees."""
