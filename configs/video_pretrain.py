"""The offline video pipeline (mbjax/offline/pipeline/): gameplay video → chunks → IDM
actions → video rewards → episodes → skill tokens → offline world model and dream policy.

Your own videos (a directory of .mp4/.mkv/.webm/.avi files; README, "Your own videos"):
  python -m experiments.video_pretrain --config=configs/video_pretrain.py \\
      --config.source.video_dir=path/to/videos --workdir=runs/video --phase=convert
  python -m experiments.label_chunks --config=configs/video_pretrain.py \\
      --chunks=runs/video/chunks --recording=path/to/videos/<name>.npz
  python -m experiments.video_pretrain --config=configs/video_pretrain.py \\
      --config.source.video_dir=path/to/videos --workdir=runs/video
  (idm_train learns from the chunks label_chunks marks human-labelled.)

Validation against ground truth (`:arena`): records BonkArena gameplay (scripted, random and
trained policies, fixed and player-following cameras, two palettes) with its true actions,
labels 10% of the chunks with them, runs every phase and prints the report table:
  python -m experiments.video_pretrain --config=configs/video_pretrain.py:arena \\
      --config.ground_truth.checkpoint=runs/arena_base --workdir=runs/video_arena
(`checkpoint`: the trained policy's run directory; the default, runs/arena_ppo, is where
`make train` writes; relative to the directory the command runs from, and checked before
the first phase.) Expected (measured 2026-11-26 on the 2-core CPU, 42.5 min, with 10% of the
chunks labelled, `ground_truth.label_unit=chunk`, and the progress reward; BENCHMARKS.md,
"Offline video pipeline"), on the 90% of chunks the IDM labels (23,502 frames): menu-card
accuracy 0.992 on menu frames (0.997 on all), movement R² 0.913 on the frames whose move is
visible (fixed camera 0.88, following 0.95); reward-model Spearman 0.830 against true
progress on the 8 held-out BonkArena episodes; skill perplexity 144 (249 of 256 codes used);
the offline dream policy returns −29.8 in BonkArena (random play −6.7; on the 72 episodes
below, 2026-12-07, imitating the cloned policy: −5.5 / −5.5 / −5.0 over seeds 0–2 against
random −6.9 / −6.9 / −7.2 and the cloned policy's −4.0 / −5.1 / −2.6). IDM training 4,000
steps takes ~28 min of the run. Deaths and the video reward against the game's (72 episodes,
BENCHMARKS.md): with the death screen, held-out deaths found 11/11, 11/11, 10/10 with 0, 0, 1
false terminals over seeds 0–2 (2026-12-07); video vs true return Spearman over 15-step
windows 0.43 / 0.42 / 0.33 and per episode 0.81 / 0.51 / 0.66 (seeds 0–2, 2026-12-07, the
reward learnt from the labelled videos' game reward; the progress ranking, `objective=
progress`: −0.02 / 0.21, and −0.21 / −0.48 as upstream's clock, `death_window=0`).

Behaviour cloning from video (BENCHMARKS.md, "Behaviour cloning from video"): 96 scripted
episodes, cloned from the IDM's labels and played in BonkArena drawn like the videos:
  python -m experiments.video_pretrain --config=configs/video_pretrain.py:arena \
      --config.ground_truth.policies="('scripted',)" --config.ground_truth.episodes=96 \
      --config.ground_truth.atari_games="()" --config.idm.steps=1000 \
      --config.idm.lr_decay_steps=1000 --workdir=runs/video_bc \
      --phase=ground_truth,convert,attach_labels,idm_train,idm_label,bc_train,eval
Expected (2026-12-07, 2-core CPU, seed 0; bc_train 12,000 steps 59 min beside other jobs,
eval 8 min): over 128 games, the cloned policy returns −2.1 ± 1.2 against the scripted
player's 5.7 and random −7.1, 0.39 of the scripted player's gain over random; per look
fixed −4.1 / −6.8, follow +2.6 / 0.0. Without the locator's view (`--config.bc.crop_fraction=0`,
2026-12-06, 3 seeds): 0.09–0.13, the fixed camera below random (it walks into walls).

Debug (`:debug`): a few short episodes and tiny models; tests/offline/test_pipeline.py.

Devices: every training phase is data-parallel over `--config.run.num_devices=N` (0, the
default: all local devices); idm.batch, reward.batch, skills.batch and
learner.offline.batch_size are global batches and must divide by N.
"""
from mbjax.offline import pipeline


def get_config(arg: str | None = None):
  if arg not in (None, "arena", "debug"):
    raise ValueError(f"configs/video_pretrain.py: unknown variant {arg!r}; expected 'arena' "
                     "or 'debug'")
  cfg = pipeline.base_config()
  if arg in ("arena", "debug"):
    cfg.ground_truth.enabled = True
    cfg.ground_truth.variants = ("fixed:default", "follow:default", "fixed:desert",
                                 "follow:desert")
  if arg == "arena":
    # The trained policy is the main job's agent (`make train`). Atari clips test the reward
    # model out of domain (never trained on: reward.holdout_sources); their true progress is
    # the game score, so games where random play scores steadily (random Breakout scores no
    # points in its clip; Pong's score is the net points, which fall as the opponent scores).
    cfg.ground_truth.policies = ("scripted", "random", "checkpoint")
    cfg.ground_truth.checkpoint = "runs/arena_ppo"
    cfg.ground_truth.update(atari_games=("space_invaders", "ms_pacman"), atari_clips=2)
    # With reward.objective="progress": pairs at least 15 frames (0.5 s) apart — held-out
    # Spearman against true progress 0.81 over two seeds (0.73 / 0.79 adjacent, 0.74 at 30;
    # measured with pool="mean", stem=8, channels=(32, 64, 64)).
    cfg.reward.min_gap = 15
    # Movement: 256-px recordings area-resampled to 128² chunks, where the player moves
    # ~1.6 px per frame drawn anti-aliased (sub-pixel positions show); the IDM reads it
    # through a cost volume (mbjax/offline/idm.py), with half of each training batch placed
    # on frames whose move is visible (the trained agent's clips are mostly menu frames).
    cfg.ground_truth.pixel_size = 256
    cfg.convert.size = 128
    # A 3-frame window, half the clips mirrored/transposed, 4,000 steps, and a 128-px
    # matching grid (full resolution at 128²: the player's ~1.6 px per frame is 0.8 px at
    # half resolution): held-out movement R² 0.913 (half resolution: 0.884; window 7 and
    # 1,000 steps: 0.80; BENCHMARKS.md).
    cfg.idm.update(motion_input="cost_volume", motion_fraction=0.5, window=3,
                   symmetry_fraction=0.5, steps=4000, lr_decay_steps=4000, cost_grid=128)
    # Behaviour cloning imitates the scripted player's videos, turned by quarter turns (the
    # arena looks the same turned; a mirror would reverse the way it circles the enemies).
    # 12,000 steps at 1e-3: held-out direction cosine 0.49 (3,000 steps at 3e-4: 0.38).
    cfg.bc.update(episodes="*_scripted_*", symmetry_fraction=0.75, lr=1e-3, steps=12000)
    # The fixed camera's videos teach the player locator; the policy also reads the view
    # centred on it, half the frame's side (the follow camera's view): 0.39 of the scripted
    # player's gain over random, against 0.10 without it (one seed, 2026-12-07).
    cfg.bc.update(crop_fraction=0.5, locator_episodes="*_fixed_*")
    # The world model sees what the cloned policy reads beside the reward model's embedding
    # (mean-pooled: blind to where the player is): the dream actor's wall time, seed 0,
    # −8.7 → −2.3 a game, imitating all recorded play alike (2026-12-07).
    cfg.export.features = ("reward", "bc")
    # The dream actor imitates the cloned policy (the scripted player's videos) rather than
    # all recorded play alike, and a half of the replayed windows hold a card pick (0.25%
    # of the steps): seeds 0–2, −10.0 / −10.8 / −17.9 → −5.5 / −5.5 / −5.0 against random
    # −6.9 / −6.9 / −7.2, menu fraction 0.03 → 0.006 (2026-12-07, BENCHMARKS.md).
    cfg.dream_teacher = "bc"
    cfg.learner.offline.rare_fraction = 0.5
    # The offline world model and dream policy at the budget of the recorded run.
    cfg.world_model_steps, cfg.dream_steps = 1000, 500
  if arg == "debug":
    # One policy in two looks: two compiled episode functions (each policy × look is one),
    # and one short Atari clip, so the always-held-out source path runs too.
    # Three of the four BonkArena videos labelled: at least one is a training video.
    cfg.ground_truth.update(episodes=4, time_limit=120, label_fraction=0.75, pixel_size=64,
                            policies=("scripted",), variants=("fixed:default", "follow:desert"),
                            atari_games=("space_invaders",), atari_clips=1, atari_steps=120)
    cfg.convert.update(size=32, chunk_frames=60)
    cfg.idm.update(steps=20, batch=4, clip_length=9, channels=(8, 16), embed_dim=32,
                   hidden=32, keypoints=4, stem=4, label_batch=32)
    # 300 reward steps (a few seconds): enough for the held-out progress to rise with time
    # (Spearman ≈ 0.5; 20 steps left it at ≈ −0.3), which the pipeline test checks.
    cfg.reward.update(steps=300, lr_decay_steps=300, batch=8, channels=(8, 16), embed_dim=32,
                      stem=4, score_batch=32)
    cfg.death.update(steps=20, batch=8, channels=(8, 16), embed_dim=16, stem=4,
                     score_batch=32)
    cfg.skills.update(steps=20, batch=16, num_codes=16, code_dim=8, hidden=32)
    cfg.bc.update(steps=20, batch=8, channels=(8, 16), embed_dim=16, hidden=16, stem=4,
                  move_bins=5, crop_fraction=0.5, locator_channels=(4, 4), locator_steps=5,
                  locator_gap=2, locator_batch=4)
    cfg.learner.world_model.update(deter=16, blocks=2, stoch=4, classes=4, hidden=16)
    cfg.learner.replay.update(seq_len=6, burn_in=2)
    cfg.learner.dream.update(hidden_sizes=(16,), horizon=3)
    cfg.learner.offline.batch_size = 4
    cfg.export.min_length = 8
    cfg.export.features = ("reward", "bc")  # both kinds of features exported and played
    cfg.dream_teacher = "bc"  # the dream actor imitates the cloned policy, which plays too
    cfg.world_model_steps = cfg.dream_steps = 10
    cfg.fast_compile = True
    cfg.log_every = 5
    cfg.eval.update(episodes=2, max_steps=50, bc_episodes=2, probe_episodes=1, probe_steps=50)
  return cfg
