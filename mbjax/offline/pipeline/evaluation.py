"""The pipeline's measurements against ground truth and the `eval` phase that writes them to
`report.json` and prints them as a table: IDM accuracy and movement R² per group of frames,
deaths found in the held-out videos, the video reward against the game's own reward (and on
play it must not pay for) and the progress scores' rank correlation with true progress on
held-out episodes, skill-token perplexity, the behaviour-cloned policy against its
demonstrator and random play, and the dream policy's return in BonkArena (measured by the
`dream` phase).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mbjax import files
from mbjax.offline import bc as bc_lib
from mbjax.offline import chunks as chunks_lib
from mbjax.offline import deaths as deaths_lib
from mbjax.offline import idm_labelling, idm_training
from mbjax.offline import reward_model as reward_lib
from mbjax.offline.pipeline import config as config_lib
from mbjax.offline.pipeline.config import action_spec
from mbjax.offline.pipeline.models import BC, frame_features, load_reward
from mbjax.offline.pipeline.workspace import (Skipped, Workspace, episodes_of, model_exists,
                                              readable_chunks, saved_model_config,
                                              source_look, truth_for_chunk, truth_meta,
                                              unpack_actions)
from mbjax.train import offline as offline_lib


def video_env(cfg, look: str):
  """(BonkArena drawn like the ground-truth videos in `look` ("camera:palette"), a function
  from its observations [..., S, S, 3] to chunk frames [..., size, size, 3]): the game is
  drawn at `ground_truth.pixel_size` and area-averaged down to `convert.size` — what
  `convert`'s AREA resize does to the recorded videos, for a whole factor — or resized
  linearly (antialiased) for any other pair of sizes."""
  from mbjax.envs.bonk_arena import BonkArena  # the validation set-up's game
  camera, _, palette = look.partition(":")
  drawn, size = cfg.ground_truth.pixel_size, cfg.convert.size
  env = BonkArena(observation="pixels", pixel_size=drawn, camera=camera, palette=palette,
                  upgrade_hud=cfg.ground_truth.upgrade_hud,
                  view_fraction=cfg.ground_truth.view_fraction)

  def to_frame(obs):
    lead = obs.shape[:-3]
    if drawn == size:
      return obs
    if drawn % size == 0:
      factor = drawn // size
      frames = obs.reshape(lead + (size, factor, size, factor, 3)).astype(jnp.float32).mean(
          axis=(-4, -2))
    else:
      frames = jax.image.resize(obs.astype(jnp.float32), lead + (size, size, 3), "linear")
    return jnp.clip(jnp.round(frames), 0, 255).astype(jnp.uint8)

  return env, to_frame


def _play_summary(played: dict, weights: np.ndarray) -> dict:
  """Episodes' `return`, `length` and summed `reward_terms` → mean return with its normal 95%
  interval, mean length, the share of steps in the level-up menu and each reward term's
  mean contribution (weight × summed term): a wall-pinning policy shows there."""
  from mbjax.envs.bonk_arena import rewards  # the validation set-up's game
  returns, lengths = np.asarray(played["return"]), np.asarray(played["length"])
  terms = np.asarray(played["reward_terms"])
  return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
          "return_ci95": float(1.96 * np.std(returns, ddof=1) / np.sqrt(len(returns)))
          if len(returns) > 1 else None,
          "length_mean": float(np.mean(lengths)),
          "menu_fraction": float(np.sum(terms[:, rewards.MENU]) / max(np.sum(lengths), 1)),
          "reward_terms": {name: float(np.mean(terms[:, i]) * weights[i])
                           for i, name in enumerate(rewards.REWARD_TERMS)}}


def evaluate_dream_policy(ws: Workspace, trainer: offline_lib.OfflineTrainer, state,
                          cfg) -> dict:
  """The saved dream policy in BonkArena vs the uniform random policy (same keys): mean
  return and length, menu fraction and each reward term's mean contribution. The game is
  drawn like the videos (`video_env`, the first ground-truth look) and each frame is turned
  into what the world model saw: resized to `export.frame_size`, or the exported features
  (`models.frame_features`). The random policy ignores its observations, so it plays the
  same game with vector observations (no drawing to compile). With `dream_teacher="bc"`
  the cloned policy it imitated plays too (on the frames, the random policy's games), so
  what imagination added to the imitation shows."""
  if trainer.learners.dream is None or not cfg.ground_truth.enabled:
    return {"skipped": "needs the dream learner and the BonkArena ground-truth set-up"}
  from mbjax.envs.bonk_arena import BonkArena, random_policy, rollout  # validation
  env, to_frame = video_env(cfg, cfg.ground_truth.variants[0])
  params = env.default_params()
  if cfg.export.observation == "embeddings":
    features, _ = frame_features(ws, cfg)
    obs_fn = lambda obs: features(to_frame(obs))
  else:
    size = cfg.export.frame_size
    obs_fn = lambda obs: jax.image.resize(
        to_frame(obs), (obs.shape[0], size, size, 3), "linear").round().clip(0, 255).astype(
            np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 7), cfg.eval.episodes)
  options = config_lib.compiler_options(cfg)
  play = jax.jit(jax.vmap(lambda key: offline_lib.play_latent_policy(
      env, params, trainer.learners, state.aux, key, cfg.eval.max_steps, obs_fn=obs_fn,
      summed_info=("reward_terms",))), compiler_options=options)
  dream = jax.device_get(play(keys))
  vector_env = BonkArena(observation="vector")
  play_random = jax.jit(lambda key: rollout.evaluate(
      vector_env, params, random_policy, key, cfg.eval.episodes, cfg.eval.max_steps),
                        compiler_options=options)
  random = jax.device_get(play_random(keys[0]))
  weights = np.asarray(params.reward_weights, np.float64)
  report = {"episodes": cfg.eval.episodes, "dream": _play_summary(dream, weights),
            "random": _play_summary(random, weights)}
  if cfg.dream_teacher == "bc":
    bc_params, _ = BC.load(ws, cfg)
    teacher = bc_lib.policy_fn(bc_params, config_lib.bc_config(cfg), action_spec(cfg),
                               to_frame)
    play_teacher = jax.jit(lambda key: rollout.evaluate(
        env, params, teacher, key, cfg.eval.episodes, cfg.eval.max_steps),
                           compiler_options=options)
    report["teacher"] = _play_summary(jax.device_get(play_teacher(keys[0])), weights)
  return report


def evaluate_bc(ws: Workspace, cfg) -> dict:
  """The behaviour-cloned policy in BonkArena, drawn like the videos (`video_env`; the
  `eval.bc_episodes` games split evenly over the ground-truth looks), against the policy
  that played the videos it imitated, as it played them (with `ground_truth.menu_pick_prob`'s
  menu dwell), when one policy did, and the uniform random policy — the same games for all
  three (the same keys; the other two play with vector observations). Reports each one's
  `_play_summary`, the return per look, and `demonstrator_fraction` = (BC − random) /
  (demonstrator − random) of the mean returns."""
  directory = ws.model_dir("bc")
  if not model_exists(directory):
    return {"bc": "no behaviour-cloned policy"}
  if not cfg.ground_truth.enabled:
    return {"bc": "playing it needs the BonkArena ground-truth set-up"}
  from mbjax.envs.bonk_arena import BonkArena, random_policy, rollout  # validation
  from mbjax.offline import ground_truth

  bc_params, _ = BC.load(ws, cfg)
  bc_cfg, spec = config_lib.bc_config(cfg), action_spec(cfg)
  imitated = saved_model_config(directory)["imitated_episodes"]
  grouped = episodes_of(ws.chunk_paths(), Skipped("eval"))
  policies = sorted({_policy(truth_meta(chunks_lib.read_chunk(grouped[e][0], ("video_source",))))
                     for e in imitated if e in grouped})
  looks = tuple(cfg.ground_truth.variants)
  per_look = -(-cfg.eval.bc_episodes // len(looks))
  look_keys = [jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 11), i)
               for i in range(len(looks))]
  steps, options = cfg.eval.max_steps, config_lib.compiler_options(cfg)
  gathered = lambda runs: {k: np.concatenate([np.asarray(r[k]) for r in runs])
                           for k in ("return", "length", "reward_terms")}
  played = {}
  for look, key in zip(looks, look_keys):
    env, to_frame = video_env(cfg, look)
    policy = bc_lib.policy_fn(bc_params, bc_cfg, spec, to_frame)
    played[look] = jax.device_get(jax.jit(lambda key: rollout.evaluate(
        env, env.default_params(), policy, key, per_look, steps), compiler_options=options)(key))
  vector_env = BonkArena(observation="vector")
  params = vector_env.default_params()
  weights = np.asarray(params.reward_weights, np.float64)

  def play_vector(policy_fn):
    play = jax.jit(lambda key: rollout.evaluate(vector_env, params, policy_fn, key, per_look,
                                                steps), compiler_options=options)
    return gathered([jax.device_get(play(key)) for key in look_keys])

  report = {"episodes": per_look * len(looks), "imitated_episodes": len(imitated),
            "imitated_policies": policies,
            "bc": _play_summary(gathered(list(played.values())), weights),
            "bc_return_per_look": {look: float(np.mean(np.asarray(p["return"])))
                                   for look, p in played.items()},
            "random": _play_summary(play_vector(random_policy), weights)}
  if len(policies) == 1 and policies[0] in ("scripted", "random", "checkpoint"):
    _, demonstrator = ground_truth.make_policy(policies[0], cfg.ground_truth.checkpoint)
    demonstrator = ground_truth.with_menu_dwell(demonstrator, cfg.ground_truth.menu_pick_prob)
    report["demonstrator"] = _play_summary(play_vector(demonstrator), weights)
    gap = report["demonstrator"]["return_mean"] - report["random"]["return_mean"]
    report["demonstrator_fraction"] = (
        (report["bc"]["return_mean"] - report["random"]["return_mean"]) / gap
        if abs(gap) > 1e-6 else None)
  return {"bc": report}


def evaluate_idm(ws: Workspace, cfg) -> dict:
  """IDM labels of the chunks it labelled (the 90% without labels) against the truth, per
  group of frames: all, menu overlay vs gameplay, player-speed bins, and camera."""
  spec, skipped = action_spec(cfg), Skipped("eval")
  pred_c, pred_d, true_c, true_d, groups = [], [], [], [], {}
  for path, arrays in readable_chunks(ws.chunk_paths(), skipped):
    meta = chunks_lib.decode_meta(arrays["meta"], path)
    truth = truth_for_chunk(arrays, path)
    if meta.get("action_labeling") != "idm" or truth is None or "menu_open" not in truth:
      continue
    continuous, discrete = unpack_actions(arrays["actions"], spec)
    pred_c.append(continuous)
    pred_d.append(discrete)
    true_c.append(idm_training.norm_clipped(truth["actions_continuous"]))
    true_d.append(truth["actions_discrete"].reshape(len(continuous), -1))
    menu, speed = truth["menu_open"].astype(bool), truth["player_speed"]
    camera = truth_meta(arrays).get("camera", "unknown")
    edges = (0.0,) + tuple(cfg.eval.speed_bins) + (np.inf,)
    frame_groups = {"all": np.ones_like(menu), "menu": menu, "gameplay": ~menu,
                    f"camera_{camera}": ~menu}
    for lo, hi in zip(edges[:-1], edges[1:]):
      frame_groups[f"speed_{lo:g}-{hi:g}"] = ~menu & (speed >= lo) & (speed < hi)
    for name, mask in frame_groups.items():
      groups.setdefault(name, []).append((len(pred_c) - 1, mask))
  if not pred_c:
    return {"idm": "no IDM-labelled chunk with ground truth"}
  lengths = np.cumsum([0] + [len(c) for c in pred_c])
  total = lengths[-1]
  masks = {}
  for name, entries in groups.items():
    mask = np.zeros(total, bool)
    for index, m in entries:
      mask[lengths[index]:lengths[index + 1]] = m
    masks[name] = mask
  pred = idm_labelling.IDMLabels(np.concatenate(pred_c), np.concatenate(pred_d), ())
  # Movement is scored where the video shows it: the game is paused under the menu.
  result = idm_labelling.evaluate_labels(pred, np.concatenate(true_c),
                                         np.concatenate(true_d), masks,
                                         move_visible=~masks["menu"])
  return {"idm": result, "skipped": skipped.entries}


def _mean_defined(values) -> float | None:
  """Mean of the finite values (a Spearman is undefined when a sequence is constant)."""
  values = [v for v in values if np.isfinite(v)]
  return float(np.mean(values)) if values else None


def _held_out_truth(ws: Workspace, model: str, needed: tuple[str, ...]):
  """(recording meta, chunk arrays concatenated, truth concatenated) of each episode `model`
  held out whose chunks all read, all carry `needed` and all have ground truth."""
  directory = ws.model_dir(model)
  held_out = set(saved_model_config(directory)["held_out_episodes"])
  skipped = Skipped("eval")
  for episode_id, paths in episodes_of(ws.chunk_paths(), skipped).items():
    if episode_id not in held_out:
      continue
    parts = list(readable_chunks(paths, skipped))
    if len(parts) != len(paths) or any(k not in a for _, a in parts for k in needed):
      continue
    truths = [truth_for_chunk(a, p) for p, a in parts]
    if any(t is None for t in truths):
      continue
    arrays = {k: np.concatenate([a[k] for _, a in parts]) for k in needed}
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]
             if all(k in t for t in truths)}
    yield truth_meta(parts[0][1]), arrays, truth


def _policy(meta: dict) -> str:
  """The policy that played a recording (`atari` for the Atari clips)."""
  return "atari" if meta.get("source") == "atari" else meta.get("policy", "unknown")


def evaluate_deaths(ws: Workspace, cfg) -> dict:
  """The `terminals` death_label marked in each held-out BonkArena video against its true
  deaths (`terminated`): a death is found when a terminal lies within `death.tolerance`
  frames of it; a terminal farther from every death is false. Per policy and over all."""
  if not model_exists(ws.model_dir("death")):
    return {"death": "no death model"}
  per_policy = {}
  for meta, arrays, truth in _held_out_truth(ws, "death", ("terminals",)):
    policy = _policy(meta)
    if "terminated" not in truth:
      continue  # no true episode ends (Atari clips record lives, not deaths)
    counts = deaths_lib.match_terminals(arrays["terminals"], truth["terminated"],
                                        cfg.death.tolerance)
    entry = per_policy.setdefault(policy, {"videos": 0, "frames": 0})
    entry["videos"] += 1
    entry["frames"] += len(arrays["terminals"])
    for key, value in counts.items():
      entry[key] = entry.get(key, 0) + value
  if not per_policy:
    return {"death": "no held-out video with true deaths and death labels"}
  total = {"videos": 0, "frames": 0}
  for entry in per_policy.values():
    for key, value in entry.items():
      total[key] = total.get(key, 0) + value
  summary = {**per_policy, "all": total}
  for entry in summary.values():
    entry["found_fraction"] = (entry["detected"] / entry["deaths"] if entry["deaths"]
                               else None)
    entry["false_per_frame"] = entry["false_terminals"] / entry["frames"]
  return {"death": summary}


def evaluate_video_reward(ws: Workspace, cfg) -> dict:
  """The video reward (the chunks' `rewards`) against the game's own per-step reward on the
  held-out BonkArena episodes: Spearman between video and true returns over consecutive
  `eval.reward_window`-step windows (per policy, and all windows pooled), and between
  per-episode returns across every held-out episode — what a reward that pays for time,
  not play, fails."""
  if not model_exists(ws.model_dir("reward")):
    return {"video_reward": "no reward model"}
  width, windows, returns = cfg.eval.reward_window, {}, {}
  for meta, arrays, truth in _held_out_truth(ws, "reward", ("rewards",)):
    policy = _policy(meta)
    if policy == "atari" or "rewards" not in truth:
      continue
    video, game = arrays["rewards"], truth["rewards"]
    starts = np.arange(0, len(game) - width + 1, width)
    entry = windows.setdefault(policy, ([], []))
    entry[0].extend(video[a:a + width].sum() for a in starts)
    entry[1].extend(game[a:a + width].sum() for a in starts)
    returns.setdefault(policy, []).append((float(video.sum()), float(game.sum())))
  if not returns:
    return {"video_reward": "no held-out BonkArena episode with video rewards"}
  summary = {policy: {"windows": len(v), "window_spearman": reward_lib.spearman(v, g),
                      "episodes": len(returns[policy]),
                      "video_return_mean": float(np.mean([r[0] for r in returns[policy]])),
                      "true_return_mean": float(np.mean([r[1] for r in returns[policy]]))}
             for policy, (v, g) in sorted(windows.items())}
  pooled = [np.concatenate([np.asarray(w[i]) for w in windows.values()]) for i in (0, 1)]
  episodes = np.asarray([r for rs in returns.values() for r in rs])
  summary["all"] = {"window_steps": width, "windows": len(pooled[0]),
                    "window_spearman": reward_lib.spearman(*pooled),
                    "episodes": len(episodes),
                    "episode_spearman": reward_lib.spearman(episodes[:, 0], episodes[:, 1])}
  return {"video_reward": summary}


def evaluate_reward_probes(ws: Workspace, cfg) -> dict:
  """The video reward of play it must not pay for, against random play, in BonkArena drawn
  like the videos: `eval.probe_episodes` games a look of random play and of a constant move
  (which pins the player to a wall, 0.05 a step), each `eval.probe_steps` at most. Per
  policy: the true and the video return (the sum of the rewards `reward_label` would give)
  and the wall term, mean over games; a video return that does not fall with the wall term
  is a reward a wall-pinning policy can exploit."""
  if not model_exists(ws.model_dir("reward")):
    return {"reward_probes": "no reward model"}
  if not cfg.ground_truth.enabled or not cfg.eval.probe_episodes:
    return {"reward_probes": "probes need the BonkArena ground-truth set-up"}
  from mbjax.envs.bonk_arena import random_policy, rewards, rollout  # validation
  from mbjax.envs.spaces import HybridAction
  params, reward_cfg, _ = load_reward(ws, cfg)
  spec = action_spec(cfg)

  def constant_move(key, obs, mask):
    del key, obs, mask
    return HybridAction(jnp.full((spec.continuous_dim,), 0.5).at[0].set(1.0),
                        jnp.zeros((spec.num_branches,), jnp.int32))

  played = {"random": [], "constant_move": []}
  options = config_lib.compiler_options(cfg)
  for look_index, look in enumerate(cfg.ground_truth.variants):
    env, to_frame = video_env(cfg, look)
    env_params = env.default_params()
    weights = np.asarray(env_params.reward_weights, np.float64)
    for name, policy in (("random", random_policy), ("constant_move", constant_move)):
      play = jax.jit(lambda key: rollout.play_episode(
          env, env_params, policy, key, with_frames=True, num_steps=cfg.eval.probe_steps),
                     compiler_options=options)
      for game in range(cfg.eval.probe_episodes):
        episode = jax.device_get(play(jax.random.PRNGKey(cfg.seed * 1000 + look_index * 100
                                                         + game)))
        length = int(np.sum(episode.valid))
        frames = np.asarray(to_frame(episode.frames[:length]))
        _, video = reward_lib.video_rewards(params, reward_cfg, frames, cfg.reward.scale)
        terms = np.sum(np.asarray(episode.reward_terms[:length], np.float64), 0) * weights
        played[name].append((float(np.sum(episode.rewards[:length])), float(np.sum(video)),
                             float(terms[rewards.REWARD_TERMS.index("wall")])))
  return {"reward_probes": {
      name: {"games": len(games), "true_return_mean": float(np.mean([g[0] for g in games])),
             "video_return_mean": float(np.mean([g[1] for g in games])),
             "wall_term_mean": float(np.mean([g[2] for g in games]))}
      for name, games in played.items()}}


def evaluate_rewards(ws: Workspace, cfg) -> dict:
  """Spearman rank correlation of each held-out episode's progress scores with its true
  progress and with time; per source look (camera:palette@size, or atari_<game>), per
  source (BonkArena, Atari) and over all, the mean over episodes where it is defined.

  True progress: BonkArena, the XP collected so far (`xp_total`); Atari, the game score so
  far (`score`: ale-py's rewards summed before the frame — points scored, or in Pong the
  net points). A clip whose score never changes has no defined score correlation; it still
  counts for the correlation with time, the order the model was trained to recover.
  """
  if not model_exists(ws.model_dir("reward")):
    return {"reward": "no reward model"}
  per_look = {}
  for meta, arrays, truth in _held_out_truth(ws, "reward", ("progress_scores",)):
    progress = arrays["progress_scores"]
    score_key = "xp_total" if "xp_total" in truth else "score"
    if score_key not in truth:
      continue
    true_score = truth[score_key]
    entry = per_look.setdefault(source_look(meta), {"score": [], "time": []})
    entry["score"].append(reward_lib.spearman(progress, true_score))
    entry["time"].append(reward_lib.spearman(progress, np.arange(len(progress))))

  def summarise(entries) -> dict:
    score = [v for e in entries for v in e["score"]]
    time_ = [v for e in entries for v in e["time"]]
    return {"episodes": len(score), "episodes_score_defined": int(np.isfinite(score).sum()),
            "spearman_score": _mean_defined(score), "spearman_time": _mean_defined(time_)}

  summary = {look: summarise([e]) for look, e in sorted(per_look.items())}
  summary["all_bonk_arena"] = summarise([e for look, e in per_look.items()
                                         if not look.startswith("atari")])
  summary["all_atari"] = summarise([e for look, e in per_look.items()
                                    if look.startswith("atari")])
  summary["all"] = summarise(per_look.values())
  return {"reward": summary}


def evaluate_skills(ws: Workspace, cfg) -> dict:
  """Perplexity exp(H) of the skill-token distribution over all labelled frames' windows
  and the fraction of the codebook in use."""
  tokens, skipped = [], Skipped("eval")
  for _, arrays in readable_chunks(ws.chunk_paths(), skipped):
    if "skill_tokens" in arrays:
      t = arrays["skill_tokens"]
      tokens.append(t[t >= 0][::cfg.skills.window])  # one entry per labelling window
  if not tokens:
    return {"skills": "no skill tokens"}
  tokens = np.concatenate(tokens)
  counts = np.bincount(tokens, minlength=cfg.skills.num_codes).astype(np.float64)
  p = counts / counts.sum()
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
  return {"skills": {"windows": int(len(tokens)), "perplexity": float(np.exp(entropy)),
                     "codes_used": int((counts > 0).sum()),
                     "usage_fraction": float((counts > 0).mean())}}


def evaluate(ws: Workspace, cfg) -> dict:
  """The `eval` phase: every measurement above, and each finished phase's seconds."""
  report = {**evaluate_idm(ws, cfg), **evaluate_deaths(ws, cfg),
            **evaluate_video_reward(ws, cfg), **evaluate_reward_probes(ws, cfg),
            **evaluate_rewards(ws, cfg),
            **evaluate_skills(ws, cfg), **evaluate_bc(ws, cfg)}
  report["dream"] = ws.record.get("dream", {}).get("evaluation", "dream phase not run")
  report["throughput"] = {phase: info["seconds"] for phase, info in ws.record.items()
                          if "seconds" in info}
  files.write_json(ws.report, report, indent=1)
  print(format_report(report))
  return {"report": ws.report}


def format_report(report: dict) -> str:
  """The report as a printed table: one line per measured quantity."""
  lines = ["quantity                                   value"]
  add = lambda name, value: lines.append(
      f"{name:<42} {value:.4f}" if isinstance(value, float) else f"{name:<42} {value}")
  idm = report.get("idm")
  if isinstance(idm, dict):
    groups = sorted({k.split("/")[0] for k in idm})
    for group in groups:
      frames = idm.get(f"{group}/frames", 0)
      accuracies = [v for k, v in idm.items() if k.startswith(f"{group}/accuracy_")]
      add(f"IDM {group}: frames", frames)
      for i, value in enumerate(accuracies):
        add(f"IDM {group}: discrete accuracy (branch {i})", value)
      if f"{group}/move_r2" in idm:
        add(f"IDM {group}: movement R²", idm[f"{group}/move_r2"])
  death = report.get("death")
  if isinstance(death, dict):
    for policy, entry in death.items():
      found = entry["found_fraction"]
      add(f"deaths found [{policy}] ({entry['detected']}/{entry['deaths']})",
          "no deaths" if found is None else found)
      add(f"false terminals per frame [{policy}] ({entry['false_terminals']})",
          entry["false_per_frame"])
  video_reward = report.get("video_reward")
  if isinstance(video_reward, dict):
    width = video_reward.get("all", {}).get("window_steps", "?")
    for policy, entry in video_reward.items():
      add(f"video vs true return, {width}-step windows [{policy}]", entry["window_spearman"])
    if "all" in video_reward:
      add(f"video vs true episode return ({video_reward['all']['episodes']} episodes)",
          video_reward["all"]["episode_spearman"])
  probes = report.get("reward_probes")
  if isinstance(probes, dict):
    for policy, entry in probes.items():
      add(f"{policy} play: true / video return, wall term",
          f"{entry['true_return_mean']:+.2f} / {entry['video_return_mean']:+.2f}, "
          f"{entry['wall_term_mean']:+.2f} ({entry['games']} games)")
  reward = report.get("reward")
  if isinstance(reward, dict):
    for look, entry in reward.items():
      if not entry.get("episodes"):
        continue
      defined = f"{entry['episodes_score_defined']}/{entry['episodes']} episodes"
      add(f"reward Spearman vs true progress [{look}] ({defined})",
          "undefined" if entry["spearman_score"] is None else entry["spearman_score"])
      add(f"reward Spearman vs time [{look}]", entry["spearman_time"])
  skills = report.get("skills")
  if isinstance(skills, dict):
    add("skills: perplexity", skills["perplexity"])
    add("skills: codes used", skills["codes_used"])
  bc = report.get("bc")
  if isinstance(bc, dict):
    for policy in ("bc", "demonstrator", "random"):
      if policy in bc:
        entry = bc[policy]
        add(f"{policy} policy return (mean ± 95% CI, {bc['episodes']} episodes)",
            f"{entry['return_mean']:.2f} ± {entry['return_ci95'] or 0:.2f}")
        terms = ", ".join(f"{k} {v:+.2f}" for k, v in entry["reward_terms"].items())
        add(f"{policy} policy: reward terms", terms)
    if bc.get("demonstrator_fraction") is not None:
      add("bc: share of the demonstrator's gain over random", bc["demonstrator_fraction"])
  dream_eval = report.get("dream")
  if isinstance(dream_eval, dict) and "dream" in dream_eval:
    for policy in ("dream", "random"):
      entry = dream_eval[policy]
      add(f"{policy} policy return (mean)", entry["return_mean"])
      add(f"{policy} policy: menu fraction", entry["menu_fraction"])
      terms = ", ".join(f"{k} {v:+.2f}" for k, v in entry["reward_terms"].items())
      add(f"{policy} policy: reward terms", terms)
  return "\n".join(lines)
