"""Upstream MetaBonk's side of the peer harness: its own PyTorch modules, imported from a
checkout (`--checkout`), run in a venv with torch (CPU), numpy and opencv-python-headless
(BUILD.md, "Peers"). Nothing of upstream's code is copied here; this file builds inputs of
the row's shape and calls upstream's classes and functions:

  world_model  `src/learner/world_model.py` WorldModel.update_from_rollout on [64, 16, 204]
  ppo_learner  `src/learner/ppo.py` PolicyLearner.update_from_rollout (PPOConfig defaults:
               rollout 2048, 3 epochs × minibatches of 256, continuous 2 + branch 33)
  idm          `src/imitation` InverseDynamicsModel at 224², windows of 7 built as its
               label_actions does (edge-padded numpy windows, `_to_torch_frames`, batch 64,
               inference mode); the chunk's file I/O is left out on both sides
  reward       `TemporalRankRewardModel` at 224² over `_to_torch_frames` pieces of 128
               (label_rewards' batch), inference mode
  video        `scripts/video_to_trajectory.py` VideoToTrajectory.process_video (OpenCV
               decode, cv2.resize, np.savez_compressed chunks), audio off

Standard library, numpy and torch only, besides upstream's modules. torch runs with one
thread per core and passive OpenMP waiting: on a shared machine, threads that spin while
waiting for each other lose most of their time (upstream's world-model update took 8.1 s
with spinning, 0.42 s passive, at load 10 on the 2-core CPU; on an idle machine the two
policies run alike).
"""
from __future__ import annotations

import argparse
import importlib.util
import os  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads its OpenMP

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from experiments.peers import protocol  # noqa: E402


def _import_checkout(checkout: str):
  if not os.path.isdir(os.path.join(checkout, "src", "learner")):
    raise FileNotFoundError(f"--checkout={checkout!r}: expected upstream MetaBonk's checkout "
                            "(with src/learner/)")
  sys.path.insert(0, os.path.abspath(checkout))


def _world_model(args):
  import torch
  from src.learner.world_model import WorldModel, WorldModelConfig

  torch.manual_seed(0)
  model = WorldModel(WorldModelConfig(obs_dim=args.obs_dim, action_dim=args.action_dim))
  length, batch = 64, 16
  obs = torch.randn(length, batch, args.obs_dim)
  actions = torch.zeros(length, batch, args.action_dim)
  rewards = torch.zeros(length, batch)
  dones = torch.zeros(length, batch)
  update = lambda: model.update_from_rollout(obs, actions, rewards, dones=dones)
  update()
  run = protocol.steps_round(update, args.steps, length * batch, "transitions")
  count = sum(p.numel() for p in model.parameters())
  return run, {"parameters": count, "torch_threads": torch.get_num_threads()}


def _ppo_learner(args):
  import torch
  from src.learner.ppo import PolicyLearner, PPOConfig

  torch.manual_seed(0)
  cfg = PPOConfig()
  obs_dim, steps = 204, cfg.batch_size
  learner = PolicyLearner(obs_dim, cfg)
  obs = torch.randn(steps, obs_dim)
  with torch.no_grad():
    cont, discs, values = learner.net.dist_and_value(obs)
    actions_cont = cont.sample()
    actions_disc = torch.stack([d.sample() for d in discs], dim=-1)
    log_probs = cont.log_prob(actions_cont).sum(-1) + sum(
        d.log_prob(actions_disc[:, i]) for i, d in enumerate(discs))
  rewards = torch.randn(steps)
  dones = torch.zeros(steps)
  dones[63::128] = 1.0

  def update():
    learner.update_from_rollout(obs, actions_cont, actions_disc, rewards, dones,
                                old_log_probs=log_probs, old_values=values)

  update()
  run = protocol.steps_round(update, args.steps, steps, "transitions")
  count = sum(p.numel() for p in learner.net.parameters())
  return run, {"parameters": count, "torch_threads": torch.get_num_threads(),
               "rollout": steps, "epochs": cfg.num_epochs, "minibatch": cfg.minibatch_size}


def _random_frames(count: int, side: int):
  import numpy as np
  return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _idm(args):
  import numpy as np
  import torch
  from src.imitation import InverseDynamicsModel, VPTConfig
  from src.imitation.video_pretraining import IDMLabelConfig, _to_torch_frames

  torch.manual_seed(0)
  cfg = VPTConfig(frame_size=(args.size, args.size))
  model = InverseDynamicsModel(cfg).eval()
  label = IDMLabelConfig()
  context, batch = label.context, label.batch_size
  frames = _random_frames(args.frames, args.size)
  device = torch.device("cpu")

  def label_chunk():
    padded = np.pad(frames, ((context, context), (0, 0), (0, 0), (0, 0)), mode="edge")
    offsets = np.arange(-context, context + 1)
    out = []
    with torch.inference_mode():
      for start in range(0, len(frames), batch):
        centres = np.arange(start, min(len(frames), start + batch))
        windows = padded[(centres + context)[:, None] + offsets[None, :]]
        x = _to_torch_frames(windows.reshape((-1,) + windows.shape[2:]), device=device,
                             out_hw=cfg.frame_size)
        x = x.view(len(centres), 2 * context + 1, 3, x.shape[-2], x.shape[-1])
        result = model(x)
        out.append(torch.cat([result["movement"], torch.sigmoid(result["buttons"])], -1))
    return torch.cat(out).numpy()

  label_chunk()

  def run(index):
    del index
    return {"rates": {"frames": protocol.timed_rate(label_chunk, len(frames))}}

  return run, {"frames": len(frames), "size": args.size, "batch": batch,
               "window": 2 * context + 1, "torch_threads": torch.get_num_threads()}


def _reward(args):
  import torch
  from src.imitation.video_pretraining import (RewardLabelConfig, TemporalRankRewardModel,
                                               _to_torch_frames)

  torch.manual_seed(0)
  model = TemporalRankRewardModel(frame_size=(args.size, args.size)).eval()
  batch = RewardLabelConfig().batch_size
  frames = _random_frames(args.frames, args.size)
  device = torch.device("cpu")

  def score():
    out = []
    with torch.inference_mode():
      for start in range(0, len(frames), batch):
        out.append(model(_to_torch_frames(frames[start:start + batch], device=device,
                                          out_hw=(args.size, args.size))))
    return torch.cat(out).numpy()

  score()

  def run(index):
    del index
    return {"rates": {"frames": protocol.timed_rate(score, len(frames))}}

  return run, {"frames": len(frames), "size": args.size, "batch": batch,
               "torch_threads": torch.get_num_threads()}


def _video(args):
  path = os.path.join(args.checkout, "scripts", "video_to_trajectory.py")
  spec = importlib.util.spec_from_file_location("upstream_video_to_trajectory", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  work = tempfile.mkdtemp(prefix="peers-upstream-video-")

  def convert():
    out = os.path.join(work, "chunks")
    shutil.rmtree(out, ignore_errors=True)
    cfg = module.VideoConfig(target_fps=args.fps, resize=(args.size, args.size),
                             frames_per_chunk=args.chunk_frames, extract_audio=False,
                             output_dir=out)
    stats = module.VideoToTrajectory(cfg).process_video(args.clip)
    if "error" in stats:
      raise RuntimeError(f"process_video: {stats['error']}")
    size = sum(os.path.getsize(p) for p in stats["outputs"])
    return stats["frames_extracted"], size

  convert()
  return protocol.conversion_round(convert), {"chunk_frames": args.chunk_frames}


ROWS = {"world_model": _world_model, "world_model_upstream_layers": _world_model,
        "ppo_learner": _ppo_learner, "idm": _idm, "reward": _reward, "video": _video}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--row", choices=sorted(ROWS), required=True)
  parser.add_argument("--checkout", required=True, help="Upstream MetaBonk's checkout.")
  parser.add_argument("--steps", type=int, default=5, help="Updates per round.")
  parser.add_argument("--obs_dim", type=int, default=204)
  parser.add_argument("--action_dim", type=int, default=6)
  parser.add_argument("--frames", type=int, default=512)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--clip", default="")
  parser.add_argument("--fps", type=float, default=30.0)
  parser.add_argument("--chunk_frames", type=int, default=300)
  args = parser.parse_args()
  _import_checkout(args.checkout)
  import torch
  torch.set_num_threads(os.cpu_count())
  protocol.serve(lambda: ROWS[args.row](args))


if __name__ == "__main__":
  main()
