"""The dual-system runtime: System 1 (a goal-conditioned motor policy) on the main loop at a
fixed rate, System 2 (`mbjax.runtime.planner.System2`) on its own thread.

One module per component:
* `motor` — System 1: `motor_step_fn`, the pure network step, and `MotorPolicy`, a trained
  `configs/arena_directives.py` checkpoint (or a fresh network of that config) behind one
  jitted call per control step.
* `games` — `ArenaGame` (BonkArena in this process) and `BridgeGame` (a BonkLink client;
  `arena_observation` maps its state packets to the arena's vector observation). Both
  return a `GameView` and take `(move, menu choice)`.
* `rollouts` — `RolloutRecorder`: executed steps, with the behaviour log-prob of the
  executed action, into a replay ring.
* `controller` — `DualSystemController`, the fixed-rate loop, its level-up menu handling
  (`MenuDecider`, `NavigatorMenu`) and its timing record (`LoopStats`).
* `assembly` — `run(cfg)`: all of it built from `configs/dual_system.py`, whose fields and
  defaults are `config.base_config()`.

Inference only by default: nothing is recorded or learned unless `push.enabled`.
"""
from mbjax.runtime.dual_system.assembly import (make_motor, make_planner, reference_responder,
                                                run)
from mbjax.runtime.dual_system.controller import (DualSystemController, LoopStats, MenuDecider,
                                                  NavigatorMenu)
from mbjax.runtime.dual_system.games import (ArenaGame, BridgeGame, Game, GameView,
                                             arena_observation)
from mbjax.runtime.dual_system.motor import MotorOutput, MotorPolicy, motor_step_fn
from mbjax.runtime.dual_system.rollouts import RolloutRecorder
