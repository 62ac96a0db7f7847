"""Role specialists on BonkArena trained together from one base checkpoint, with PBT.

A population is P = len(roles) × members_per_role PPO agents that all start from the
parameters and observation statistics of one trained base (`experiments/train.py` with
`configs/arena_ppo.py`). Member m plays role `roles[m // members_per_role]`: its envs pay
the reward `dot(role_weights(role), reward_terms)` (`mbjax.envs.bonk_arena.rewards`), so the
roles differ in what they are rewarded for, not only in two hyperparameters as upstream.

Training: one jitted update advances every member at once — `jax.vmap` over the stacked
runner states, each member with its own env batch, RNG stream, role weights and PPO
hyperparameters. The hyperparameters that PBT tunes (`population.hparams`, any of
`TUNABLE`) are per-member *traced* inputs: before each member's update its learning rate is
written into its optimiser state (`ppo.with_learning_rate`; the optimiser injects it,
`optax.inject_hyperparams`) and its loss coefficients reach the loss as a
`ppo.LossCoefficients` pytree, so a perturbed learning rate or clip ε changes the next
update without recompiling.

PBT (`mbjax.population.pbt`): every `pbt_every_updates` updates each member plays
`eval_episodes` evaluation episodes (the same episode keys for every member) and is scored
by the mean of its own role's episode returns. Members of one role form a PBT group — the
roles' rewards have different scales, so only members of the same role are ranked against
each other. In each group the bottom fraction copies the agent (parameters, optimiser
state, observation statistics) and hyperparameters of a member of the top fraction; the
copies' hyperparameters are then perturbed within their declared ranges. Env states stay
with their member.

Devices: the population runs on a 1-D `data` mesh of `run.num_devices` devices (0: all;
`mbjax.train.sharding`). Each member's `num_envs` envs are split over the mesh — every
device steps every member on its own `num_envs / D` envs, the Anakin layout with a member axis
in front — while agents, hyperparameters, scores and keys are replicated. The global batch
is unchanged by D: per member and update, `num_envs × ppo.num_steps` transitions, cut into
the same minibatches (`ppo.update` shares the chunk permutation across devices). Inside the
vmapped update the loss, the advantage and observation statistics are `lax.pmean`-ed over
`data` and the gradient is taken of the averaged loss, so each member's update equals its
single-device update up to float reduction order; each env's random stream is folded from
its global index, so trajectories do not depend on D either. The env axis is split rather
than the member axis because it works for any member count (role groups rarely divide the
device count), keeps PBT's copies between members local (agents are replicated), and is the
layout of single-agent runs, so a checkpoint restores onto any device count that divides
`num_envs`. The PBT evaluation is small next to training and runs replicated on every
device.

Observation statistics are frozen at the base's by default (`freeze_obs_stats`): a task
vector θᵢ − θ_base only means something when every specialist reads the same normalised
inputs, which the merges in `mbjax.population.merge` assume.

`run(cfg, workdir)` trains (or resumes) a population with the driver loop single agents use
(`mbjax.train.loop`): chunks of `run.log_every_updates` updates, metrics per member, orbax
checkpoints of the whole population state, and at the end one standard run workdir per role
(`<workdir>/specialists/<role>`) holding the role's best member, which
`experiments/merge.py`, `experiments/evaluate_arena.py` and `restore_trained` read.
"""
from __future__ import annotations

import json
import os
import time

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from mbjax.agents import ppo
from mbjax.envs import registry
from mbjax.envs.bonk_arena import rewards, rollout
from mbjax.population import merge as merge_lib
from mbjax.population import pbt
from mbjax import files
from mbjax.train import anakin, evaluate, loop, sharding
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib
from mbjax.train.run import restore_trained

# cfg.ppo fields that may be per-member hyperparameters: each reaches the update as a
# traced value (the optimiser's learning rate, the loss coefficients).
TUNABLE = ("lr",) + ppo.LossCoefficients._fields
# Fields a base checkpoint must share with the population for its parameters to fit.
_BASE_FIELDS = ("env.", "network.", "ppo.normalize_observations")


@flax.struct.dataclass
class PopulationState:
  runners: anakin.RunnerState  # every leaf [P, ...]: member m's agent, envs, key, counter
  hparams: dict  # name → [P] float32, the tuned cfg.ppo values
  scores: jax.Array  # f32[P], mean own-role return at the last evaluation (NaN before)
  key: jax.Array  # evaluation and PBT stream
  update_step: jax.Array  # i32[], updates done by every member


def default_section() -> ml_collections.ConfigDict:
  """The `population` config section, with defaults."""
  p = ml_collections.ConfigDict()
  p.base_workdir = "runs/arena_ppo"  # a trained run of the same env and network
  p.roles = ("scout", "speedrunner", "killer", "tank")
  p.members_per_role = 2  # PBT needs >= 2 (it ranks members of one role)
  p.freeze_obs_stats = True  # keep the base's normalisation (comparable task vectors)
  p.pbt_every_updates = 20  # 0: no PBT; a multiple of run.log_every_updates
  p.pbt_fraction = 0.5  # bottom share of a role group replaced from its top share
  p.explore_factors = (0.8, 1.2)  # a replaced member's hyperparameters × one of these
  p.eval_episodes = 8  # evaluation episodes per member and PBT round (shared keys)
  p.eval_max_steps = 0  # steps per evaluation episode; 0: the env's time limit
  p.eval_deterministic = False  # act on the mode instead of sampling
  # Tuned hyperparameters (names from TUNABLE) → (low, high); start values are cfg.ppo's.
  p.hparams = ml_collections.ConfigDict()
  p.hparams.lr = (1e-5, 1e-3)
  p.hparams.ent_coef = (1e-4, 0.05)
  p.hparams.clip_eps = (0.05, 0.4)
  return p


def member_roles(cfg) -> tuple[str, ...]:
  """The role of each member, role-major: member m plays roles[m // members_per_role]."""
  p = cfg.population
  return tuple(role for role in p.roles for _ in range(p.members_per_role))


def member_names(cfg) -> tuple[str, ...]:
  k = cfg.population.members_per_role
  return tuple(f"{role}{m % k}" for m, role in enumerate(member_roles(cfg)))


def role_weight_matrix(roles) -> np.ndarray:
  """f32[len(roles), NUM_REWARD_TERMS]: each role's absolute reward weights (`rewards.role_weights`)."""
  return np.asarray([rewards.role_weights(r) for r in roles], np.float32)


def hparam_specs(cfg) -> dict[str, pbt.HParam]:
  return {name: pbt.HParam("float", float(low), float(high))
          for name, (low, high) in cfg.population.hparams.items()}


def validate(cfg) -> None:
  """config.validate plus the population section; raises ValueError naming the field."""
  config_lib.validate(cfg)
  if "population" not in cfg:
    raise ValueError("config.population is missing; start from configs/arena_population.py")
  p = cfg.population
  if cfg.env.name != "bonk_arena":
    raise ValueError(f"config.env.name={cfg.env.name!r}: role specialists need 'bonk_arena'")
  if cfg.network.core != "none" or cfg.env.frame_stack != 1:
    raise ValueError("population evaluation plays a stateless policy: config.network.core "
                     f"must be 'none' and config.env.frame_stack 1, got "
                     f"{cfg.network.core!r}, {cfg.env.frame_stack}")
  if cfg.world_model.enabled:
    raise ValueError("config.world_model.enabled=True: population training runs PPO alone")
  if not p.roles:
    raise ValueError("config.population.roles is empty")
  for role in p.roles:
    if role not in rewards.ROLES:
      raise ValueError(f"config.population.roles: unknown role {role!r}; expected one of "
                       f"{rewards.ROLES}")
  if len(set(p.roles)) != len(p.roles):
    raise ValueError(f"config.population.roles={p.roles} lists a role twice; use "
                     "members_per_role")
  for key in ("members_per_role", "eval_episodes"):
    if p[key] < 1:
      raise ValueError(f"config.population.{key}={p[key]}: expected a positive integer")
  if p.eval_max_steps < 0:
    raise ValueError(f"config.population.eval_max_steps={p.eval_max_steps}: expected >= 0")
  if p.pbt_every_updates < 0 or p.pbt_every_updates % cfg.run.log_every_updates:
    raise ValueError(
        f"config.population.pbt_every_updates={p.pbt_every_updates} must be 0 or a "
        f"multiple of config.run.log_every_updates={cfg.run.log_every_updates}")
  if p.pbt_every_updates and p.members_per_role > 1:
    try:
      pbt.truncation_count(p.members_per_role, p.pbt_fraction)
    except ValueError as e:
      raise ValueError(f"config.population.pbt_fraction={p.pbt_fraction} with "
                       f"members_per_role={p.members_per_role}: {e}") from None
  if not p.explore_factors or min(p.explore_factors) <= 0:
    raise ValueError(f"config.population.explore_factors={p.explore_factors}: expected "
                     "positive factors")
  for name, bounds in p.hparams.items():
    if name not in TUNABLE:
      raise ValueError(f"config.population.hparams.{name}: not tunable; expected one of "
                       f"{TUNABLE}")
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
      raise ValueError(f"config.population.hparams.{name}={bounds}: expected "
                       "(low, high) with 0 < low <= high")
    if not bounds[0] <= cfg.ppo[name] <= bounds[1]:
      raise ValueError(f"config.ppo.{name}={cfg.ppo[name]} lies outside "
                       f"config.population.hparams.{name}={bounds}")


class PopulationTrainer:
  """The population's pure functions for one config, jitted once and reused, sharded over
  `mesh` (default: `run.num_devices` devices)."""

  def __init__(self, cfg, mesh: Mesh | None = None):
    validate(cfg)
    self.cfg = cfg
    p = cfg.population
    self.mesh = sharding.make_mesh(cfg.run.num_devices) if mesh is None else mesh
    num_shards = self.mesh.shape[sharding.DATA_AXIS]
    if cfg.num_envs % num_shards:
      raise ValueError(f"config.num_envs={cfg.num_envs} (envs per member) must be divisible "
                       f"by the {num_shards} devices of the mesh (config.run.num_devices="
                       f"{cfg.run.num_devices})")
    self.env, self.env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
    self.roles = member_roles(cfg)
    self.names = member_names(cfg)
    self.num_members = len(self.roles)
    self.weights = jnp.asarray(role_weight_matrix(self.roles))  # [P, NUM_REWARD_TERMS]
    self.specs = hparam_specs(cfg)
    # Built from the config's own values: the network, the update count, shapes. Members'
    # trainers are rebuilt inside the vmapped update with their traced reward weights.
    self.template = anakin.make_train(cfg, self.env, self.env_params)
    self._num_shards = num_shards
    self._sharded = anakin.make_train(cfg, self.env, self.env_params, num_shards,
                                      sharding.DATA_AXIS)
    self.num_updates = self.template.num_updates
    self.env_steps_per_update = self.template.env_steps_per_update  # per member
    self.eval_steps = int(p.eval_max_steps or self.env_params.time_limit)
    # Static index groups for PBT: the members of each role, when there are two or more.
    k = p.members_per_role
    self.groups = ([np.arange(r * k, (r + 1) * k) for r in range(len(p.roles))]
                   if k > 1 else [])
    # PartitionSpecs of a PopulationState: member envs split, everything else replicated.
    self.partition = PopulationState(runners=sharding.runner_specs(leading_axes=1),
                                     hparams=P(), scores=P(), key=P(), update_step=P())
    # `init(base_agent, key)`; its output is placed as a restored checkpoint is, so the
    # compiled chunk serves fresh and restored states alike.
    self.init = jax.jit(jax.shard_map(self._init, mesh=self.mesh, in_specs=(P(), P()),
                                      out_specs=self.partition))
    self.shardings = sharding.tree_shardings(self.mesh, self.partition, self.abstract_state())
    replicated = jax.sharding.NamedSharding(self.mesh, P())
    # The evaluation reads replicated agents; pinning the output layout keeps env states
    # where the chunk expects them.
    self.score = jax.jit(self._score, out_shardings=self.shardings)
    self.pbt_round = jax.jit(self._pbt_round, out_shardings=(self.shardings, replicated))
    self._chunks, self._compiled = {}, {}

  # -- initialisation ---------------------------------------------------------------------

  def _init(self, base_agent: ppo.PPOState, key: jax.Array) -> PopulationState:
    """Every member starts from `base_agent`'s parameters and observation statistics with
    a fresh optimiser state, its own envs and its own RNG stream. Per device (under
    `shard_map`): the envs are this device's slice."""
    key, members_key = jax.random.split(key)
    # lax.map, not vmap: vmapped orthogonal initialisers can deadlock jaxlib 0.10 on CPU.
    runners = jax.lax.map(self._sharded.init, jax.random.split(members_key, self.num_members))
    stack = lambda x: jnp.broadcast_to(x, (self.num_members,) + x.shape)
    agent = runners.agent.replace(params=jax.tree.map(stack, base_agent.params),
                                  obs_stats=jax.tree.map(stack, base_agent.obs_stats))
    hparams = {name: jnp.full((self.num_members,), self.cfg.ppo[name], jnp.float32)
               for name in self.specs}
    return PopulationState(runners.replace(agent=agent), hparams,
                           jnp.full((self.num_members,), jnp.nan, jnp.float32), key,
                           jnp.int32(0))

  def abstract_state(self) -> PopulationState:
    """Global shapes and dtypes of a population state, computing nothing."""
    key = jax.random.PRNGKey(0)
    base_agent = jax.eval_shape(self.template.init, key).agent
    return jax.eval_shape(self.init, base_agent, key)

  def restore_target(self) -> PopulationState:
    """`abstract_state` placed on this trainer's mesh: restores a checkpoint written on any
    device count onto this one."""
    return checkpoint_lib.abstract_like(self.abstract_state(), self.shardings)

  # -- training ---------------------------------------------------------------------------

  def _member_update(self, runner: anakin.RunnerState, hparams: dict, weights: jax.Array):
    member = anakin.make_train(self.cfg, self.env,
                               self.env_params.replace(reward_weights=weights),
                               self._num_shards, sharding.DATA_AXIS)
    coefficients = ppo.LossCoefficients(*(hparams.get(name, self.cfg.ppo[name])
                                          for name in ppo.LossCoefficients._fields))
    if "lr" in hparams:
      runner = runner.replace(agent=runner.agent.replace(
          opt_state=ppo.with_learning_rate(runner.agent.opt_state, hparams["lr"])))
    new, metrics = member.update(runner, coefficients)
    if self.cfg.population.freeze_obs_stats:
      new = new.replace(agent=new.agent.replace(obs_stats=runner.agent.obs_stats))
    return new, metrics

  def update(self, state: PopulationState) -> tuple[PopulationState, dict]:
    """One rollout and PPO update of every member; metrics are [P] (with each member's
    hyperparameters, `hparam/<name>`). Per device: call it under `shard_map` over `mesh`
    with `partition` (as `chunk` does)."""
    runners, metrics = jax.vmap(self._member_update)(state.runners, state.hparams,
                                                     self.weights)
    metrics.update({f"hparam/{name}": value for name, value in state.hparams.items()})
    return state.replace(runners=runners, update_step=state.update_step + 1), metrics

  def chunk(self, num_updates: int):
    """Jitted `state -> (state, metrics [num_updates, P])`, sharded over the mesh; the
    metrics are global (reduced over devices) and replicated."""
    if num_updates not in self._chunks:
      def run(state):
        return jax.lax.scan(lambda s, _: self.update(s), state, None, num_updates)

      self._chunks[num_updates] = jax.jit(jax.shard_map(
          run, mesh=self.mesh, in_specs=(self.partition,), out_specs=(self.partition, P())))
    return self._chunks[num_updates]

  def compiled_chunk(self, num_updates: int, state: PopulationState):
    """(the chunk compiled for `state`'s shapes, compile seconds or None if cached)."""
    if num_updates in self._compiled:
      return self._compiled[num_updates], None
    start = time.perf_counter()
    self._compiled[num_updates] = self.chunk(num_updates).lower(state).compile()
    return self._compiled[num_updates], time.perf_counter() - start

  # -- evaluation and PBT -----------------------------------------------------------------

  def episode_terms(self, agent: ppo.PPOState, key: jax.Array,
                    num_episodes: int | None = None) -> jax.Array:
    """f32[E, NUM_REWARD_TERMS]: the summed reward terms of E episodes of one agent (its return under any
    role is these terms · that role's weights). Episodes are cut at `eval_max_steps`."""
    policy = evaluate.stateless_policy(self.template, agent,
                                       self.cfg.population.eval_deterministic)
    stats = rollout.evaluate(self.env, self.env_params, policy, key,
                             num_episodes or self.cfg.population.eval_episodes,
                             self.eval_steps)
    return stats["reward_terms"]

  def _evaluate(self, agents: ppo.PPOState, key: jax.Array) -> jax.Array:
    """f32[P, E]: each member's own-role return in E episodes (the same keys for all)."""
    terms = jax.vmap(self.episode_terms, (0, None))(agents, key)  # [P, E, NUM_REWARD_TERMS]
    return jnp.einsum("pet,pt->pe", terms, self.weights)

  def group_step(self, key: jax.Array, agents, hparams: dict, returns: jax.Array):
    """`pbt.step` within each role group over stacked `agents` (any [P, ...] pytree) and
    `hparams`, from evaluation returns [P, E]. Returns (agents, hparams, source, replaced):
    `source[i]` is the member whose agent member i now holds."""
    chex.assert_shape(returns, (self.num_members, None))
    p = self.cfg.population
    hparams = dict(hparams)
    source = jnp.arange(self.num_members)
    replaced = jnp.zeros((self.num_members,), bool)
    for g, idx in enumerate(self.groups):
      take = lambda x, idx=idx: x[idx]
      group_agents, group_hparams, group_source, group_replaced = pbt.step(
          jax.random.fold_in(key, g), jax.tree.map(take, agents),
          {n: take(v) for n, v in hparams.items()}, returns[idx], self.specs,
          p.pbt_fraction, tuple(p.explore_factors))
      put = lambda x, y, idx=idx: x.at[idx].set(y)
      agents = jax.tree.map(put, agents, group_agents)
      hparams = {n: put(hparams[n], group_hparams[n]) for n in hparams}
      source = source.at[idx].set(jnp.asarray(idx)[group_source])
      replaced = replaced.at[idx].set(group_replaced)
    return agents, hparams, source, replaced

  def _exploit_explore(self, state: PopulationState, returns: jax.Array, key: jax.Array):
    """PBT over the members' agents (env states stay); returns (state, info)."""
    agents, hparams, source, replaced = self.group_step(key, state.runners.agent,
                                                        state.hparams, returns)
    # A member's score describes the agent it now holds: its donor's.
    scores = pbt.member_scores(returns)[source]
    state = state.replace(runners=state.runners.replace(agent=agents), hparams=hparams,
                          scores=scores)
    return state, {"returns": returns, "source": source, "replaced": replaced}

  def _score(self, state: PopulationState) -> PopulationState:
    """Evaluates every member and records its score, copying nothing."""
    key, eval_key = jax.random.split(state.key)
    scores = pbt.member_scores(self._evaluate(state.runners.agent, eval_key))
    return state.replace(key=key, scores=scores)

  def _pbt_round(self, state: PopulationState):
    """Evaluate every member, then exploit and explore within each role group."""
    key, eval_key, step_key = jax.random.split(state.key, 3)
    returns = self._evaluate(state.runners.agent, eval_key)
    state, info = self._exploit_explore(state.replace(key=key), returns, step_key)
    return state, info


# ---------------------------------------------------------------------------------------
# Merging specialists (used by experiments/bench_population.py)


def best_members(trainer: PopulationTrainer, state: PopulationState) -> dict[str, int]:
  """Role → index of its member with the highest last score (the first if none scored)."""
  scores = np.nan_to_num(np.asarray(jax.device_get(state.scores)), nan=-np.inf)
  k = trainer.cfg.population.members_per_role
  return {role: r * k + int(np.argmax(scores[r * k:(r + 1) * k]))
          for r, role in enumerate(trainer.cfg.population.roles)}


def member(tree, index: int):
  """Member `index` of a stacked pytree, on the host (numpy slices, nothing to compile)."""
  return jax.tree.map(lambda x: np.asarray(x)[index], jax.device_get(tree))


def member_agent(state: PopulationState, index: int) -> ppo.PPOState:
  return member(state.runners.agent, index)


def merged_agent(base: ppo.PPOState, specialists: list[ppo.PPOState], method: str,
                 **merge_kwargs) -> ppo.PPOState:
  """The base agent with parameters θ_base + merge(τ₁…τₙ), τᵢ = θᵢ − θ_base; observation
  statistics and optimiser state stay the base's (as `experiments/merge.py` writes)."""
  vectors = [merge_lib.task_vector(s.params, base.params) for s in specialists]
  merged = merge_lib.merge(vectors, method, **merge_kwargs)
  return base.replace(params=merge_lib.apply_task_vector(base.params, merged))


def retains_gains(base_returns, own_returns, merged_returns, min_retention: float) -> bool:
  """The evaluated merge gate: a merge of specialists is accepted when, on each
  specialist's own role r, it keeps at least `min_retention` of that specialist's gain over
  the base, merged_r − base_r ≥ min_retention · max(own_r − base_r, 0) — so for a specialist
  that did not beat the base the merge must not fall below the base. Arrays are [n], one
  entry per specialist, each on its own role."""
  base, own, merged = (np.asarray(x, np.float64) for x in
                       (base_returns, own_returns, merged_returns))
  chex.assert_equal_shape([base, own, merged])
  required = min_retention * np.maximum(own - base, 0.0)
  return bool(np.all(merged - base >= required))


# ---------------------------------------------------------------------------------------
# The driver: build, resume, loop, log, save


def load_base(cfg) -> ppo.PPOState:
  """The base agent of `cfg.population.base_workdir`, checked to fit `cfg`'s network."""
  workdir = cfg.population.base_workdir
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise checkpoint_lib.RunNotFoundError(
        f"config.population.base_workdir={workdir!r} holds no trained run (config.json); "
        "train one first: python -m experiments.train --config=configs/arena_ppo.py "
        f"--workdir={workdir}")
  base_trainer, base_runner = restore_trained(workdir)
  old, new = config_lib.flatten(base_trainer.cfg), config_lib.flatten(cfg)
  differing = [f"{k}: base {old.get(k)!r} vs population {new.get(k)!r}"
               for k in sorted(set(old) | set(new))
               if k.startswith(_BASE_FIELDS) and old.get(k) != new.get(k)]
  if differing:
    raise ValueError(f"base {workdir} does not fit this population's config:\n  "
                     + "\n  ".join(differing))
  return jax.device_get(base_runner.agent)


def restore_population(workdir: str, num_devices: int = 1
                       ) -> tuple[PopulationTrainer, PopulationState]:
  """(trainer, state) of the latest checkpoint of a population run, from its config, on a
  mesh of `num_devices` devices (whatever device count wrote it)."""
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  trainer = PopulationTrainer(cfg, sharding.make_mesh(num_devices))
  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.run.keep_checkpoints)
  step, state = checkpointer.restore_latest(trainer.restore_target(), cfg)
  checkpointer.close()
  if step is None:
    raise checkpoint_lib.RunNotFoundError(f"no checkpoint under {checkpointer.directory}")
  return trainer, state


def export_specialists(trainer: PopulationTrainer, state: PopulationState,
                       workdir: str) -> dict[str, str]:
  """Writes each role's best member as a single-agent run workdir
  `<workdir>/specialists/<role>` (checkpoint + config.json) and returns role → path."""
  cfg = trainer.cfg
  update_step = int(state.update_step)
  paths = {}
  runners = jax.device_get(state.runners)
  for role, index in best_members(trainer, state).items():
    path = os.path.join(workdir, "specialists", role)
    os.makedirs(path, exist_ok=True)
    runner = member(runners, index)
    checkpointer = checkpoint_lib.Checkpointer(path, 1)
    if checkpointer.latest_step() != update_step:
      checkpointer.save(update_step, runner, cfg)
    checkpointer.close()
    files.write_json(os.path.join(path, "config.json"), cfg.to_dict())
    paths[role] = path
  return paths


def _chunk_record(trainer: PopulationTrainer, metrics: dict) -> dict:
  """Each member's chunk summary (its hyperparameters included) under its name."""
  record = {}
  for m, name in enumerate(trainer.names):
    summary = loop.summarize_chunk(jax.tree.map(lambda x, m=m: x[:, m], metrics))
    record.update({f"{name}/{k}": v for k, v in summary.items()})
  return record


class PopulationDriver(loop.Driver):
  """The population's side of the driver loop: chunks of every member's updates, a PBT
  round every `pbt_every_updates`, and the specialists' export at the end."""

  def __init__(self, cfg, trainer: PopulationTrainer):
    self.cfg, self.trainer = cfg, trainer
    self.num_updates = trainer.num_updates
    self.env_steps_per_update = trainer.env_steps_per_update  # per member

  def init(self):
    trainer = self.trainer
    logging.info("Starting a population of %d (%s) from %s: %d updates of %d env steps "
                 "per member over %d device(s).", trainer.num_members,
                 ", ".join(trainer.names), self.cfg.population.base_workdir,
                 trainer.num_updates, trainer.env_steps_per_update, trainer.mesh.size)
    return trainer.init(load_base(self.cfg), jax.random.PRNGKey(self.cfg.seed))

  def restore_target(self):
    # Onto this run's mesh, whatever device count wrote the checkpoint.
    return self.trainer.restore_target()

  def update_step(self, state) -> int:
    return int(state.update_step)

  def compile(self, state, num_updates):
    return self.trainer.compiled_chunk(num_updates, state)[1]

  def run_chunk(self, state, num_updates):
    chunk, _ = self.trainer.compiled_chunk(num_updates, state)
    state, metrics = chunk(state)
    jax.block_until_ready(state)
    return state, jax.device_get(metrics)

  def record(self, metrics, seconds):
    trainer = self.trainer
    record = _chunk_record(trainer, metrics)
    num_updates = len(metrics["loss/total"])
    record["perf/env_steps_per_second"] = (
        num_updates * trainer.env_steps_per_update * trainer.num_members / seconds)
    return record

  def learned(self, state):
    return state.runners.agent

  def after_chunk(self, state, update_step, record):
    p, trainer = self.cfg.population, self.trainer
    if not (p.pbt_every_updates and update_step % p.pbt_every_updates == 0):
      return state
    state, info = trainer.pbt_round(state)
    info = jax.device_get(info)
    scores = np.asarray(info["returns"]).mean(axis=1)
    for m, name in enumerate(trainer.names):
      record[f"{name}/pbt/eval_return"] = float(scores[m])
      record[f"{name}/pbt/source"] = int(info["source"][m])
    copies = [f"{trainer.names[m]}←{trainer.names[int(info['source'][m])]}"
              for m in np.flatnonzero(info["replaced"])]
    logging.info("PBT at update %d: eval returns %s; %s", update_step,
                 ", ".join(f"{n} {s:.2f}" for n, s in zip(trainer.names, scores)),
                 "copies " + ", ".join(copies) if copies else "no copies")
    return state

  def describe(self, record):
    return "%.0f env steps/s | returns %s" % (
        record["perf/env_steps_per_second"], ", ".join(
            f"{n} {record[f'{n}/episode/return']:.2f}" for n in self.trainer.names
            if record[f"{n}/episode/return"] is not None))

  def finish(self, state, update_step, record, workdir):
    del record
    p, trainer = self.cfg.population, self.trainer
    if update_step != trainer.num_updates:
      return state, {}, {}
    if p.members_per_role > 1 and (not p.pbt_every_updates
                                   or update_step % p.pbt_every_updates):
      state = trainer.score(state)  # pick each role's best on its final parameters
    return state, {}, {"specialists": export_specialists(trainer, state, workdir)}


def run(cfg, workdir: str, *, max_updates: int | None = None,
        trainer: PopulationTrainer | None = None) -> dict:
  """Trains (or resumes) the population `cfg` in `workdir`, stopping after update
  `max_updates` when given (a checkpoint is written there, so a rerun continues; it may
  continue on another device count). Returns the last metrics record, the final state and
  the output locations."""
  driver = PopulationDriver(cfg, trainer or PopulationTrainer(cfg))
  result = loop.run(driver, cfg, workdir, stop_after=max_updates)
  return {**result.record, "state": result.state, "outputs": result.outputs}
