"""Networks (flax.linen): encoders, the hybrid action head, actor-critics and recurrent cores."""
