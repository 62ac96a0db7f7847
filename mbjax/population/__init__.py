"""Population training as pure functions: task vectors, merges and merge gating (`merge`),
population-based training's exploit and explore over stacked populations (`pbt`)."""
from mbjax.population import merge, pbt
from mbjax.population.merge import (GatingRule, PairStatistics, apply_task_vector, gate,
                                    mean_merge, pair_statistics, task_arithmetic,
                                    task_vector, ties_merge, trim)

__all__ = ["merge", "pbt", "GatingRule", "PairStatistics", "apply_task_vector", "gate",
           "mean_merge", "pair_statistics", "task_arithmetic", "task_vector", "ties_merge",
           "trim"]
