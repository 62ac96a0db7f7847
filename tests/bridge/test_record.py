"""Recording from a BonkLink game into offline .npz chunks: frames paired with the HINP
inputs (the reference server's scripted autopilot stands in for a human)."""
import json

import numpy as np

from mbjax.bridge import client as client_lib
from mbjax.bridge import record, server


def test_records_hinp_labelled_chunks(tmp_path):
  cfg = server.ServerConfig(frame_hz=30.0, frame_format="jpeg", autopilot="scripted")
  with server.ReferenceServer(1, base_port=0, cfg=cfg) as srv:
    c = client_lib.BonkLinkClient(port=srv.ports[0])
    recorder = record.Recorder(c, str(tmp_path), fps=10.0, frames_per_chunk=8)
    paths = recorder.run(seconds=4.0, max_frames=16)
    c.close()
  assert len(paths) == 2 and recorder.missing_inputs == 0
  moves = []
  for index, path in enumerate(paths):
    chunk = np.load(path)
    assert set(chunk.files) == {"observations", "actions", "click_norm", "rewards",
                                "game_rewards", "dones", "video_source", "meta"}
    np.testing.assert_array_equal(chunk["game_rewards"], chunk["rewards"])
    assert chunk["observations"].shape == (8, 64, 64, 3)
    assert chunk["observations"].dtype == np.uint8
    assert chunk["actions"].shape == (8, 6) and chunk["actions"].dtype == np.float32
    assert chunk["dones"][-1] and chunk["rewards"].shape == (8,)
    # The scripted autopilot moves with unit-norm directions, or stands still where it has
    # nothing to seek or flee (a run's start: centre, no gems, no enemy near; and before the
    # server's first tick the snapshot reports no input); buttons other than the menu
    # click stay released.
    norms = np.linalg.norm(chunk["actions"][:, :2], axis=1)
    assert np.all((np.abs(norms - 1.0) < 1e-3) | (norms == 0.0)), norms
    moves.append(norms)
    assert not chunk["actions"][:, 2:5].any()
    meta = json.loads(str(chunk["meta"]))
    assert meta["chunk_index"] == index and meta["action_labeling"] == "hinp"
  assert np.mean(np.concatenate(moves) > 0.5) >= 0.5  # the recording holds its moves
