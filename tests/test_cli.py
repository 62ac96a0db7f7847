"""A user's mistake ends an experiments/ binary in one line naming what to fix: the flag
parser and error wrapper in process, then every binary that takes a config or a workdir, each
given one bad input (they fail before any training or compile)."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from absl import app, flags
from ml_collections.config_flags import config_flags

from experiments import cli
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARTPOLE = os.path.join(REPO, "configs", "cartpole_ppo.py") + ":debug"


def parse(argv):
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  cli.parse_flags(argv, flag_values)
  return holder.value


@pytest.mark.parametrize("override, message", [
    ("--config.ppo.lrr=1",
     "--config.ppo.lrr: the config has no key ppo.lrr; did you mean --config.ppo.lr?"),
    ("--config.pppo.lr=1",
     "--config.pppo.lr: the config has no key pppo.lr; did you mean --config.ppo.lr?"),
    ("--config.ppo.lr=abc", "flag --config.ppo.lr=abc: could not convert string to float"),
    ("--config.ppo.num_steps=1.5", "flag --config.ppo.num_steps=1.5: invalid literal for int"),
])
def test_a_bad_override_ends_in_one_line(override, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    parse(["prog", f"--config={CARTPOLE}", override])
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_good_overrides_parse():
  cfg = parse(["prog", f"--config={CARTPOLE}", "--config.ppo.lr=0.001"])
  assert cfg.ppo.lr == 0.001


@pytest.mark.parametrize("error", [
    app.UsageError("unexpected arguments"), config_lib.ConfigError("config.ppo.lr=nan"),
    checkpoint_lib.RunNotFoundError("/x/config.json not found"),
    checkpoint_lib.UnreadableCheckpointError("no checkpoint restores"),
])
def test_user_errors_end_in_one_line_and_others_raise(error, capsys):
  def main(argv):
    raise error

  with pytest.raises(SystemExit) as exit_info:
    cli.reporting_user_errors(main)(["prog"])
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == f"error: {error}\n"

  def buggy(argv):
    raise KeyError("a bug keeps its traceback")

  with pytest.raises(KeyError):
    cli.reporting_user_errors(buggy)(["prog"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# What marks a binary that takes a config or a run's workdir.
_TAKES_A_RUN = re.compile(r'DEFINE_config_file\(|DEFINE_string\("(workdir|checkpoint|base|'
                          r'conditioned)"|DEFINE_string\("out_dir"')


def test_every_binary_that_takes_a_config_or_a_workdir_reports_through_cli():
  binaries = [name for name in sorted(os.listdir(os.path.join(REPO, "experiments")))
              if name.endswith(".py") and not name.startswith(("bench_", "__"))
              and name not in ("cli.py", "throughput.py")]
  taking = []
  for name in binaries:
    with open(os.path.join(REPO, "experiments", name)) as f:
      source = f.read()
    if _TAKES_A_RUN.search(source):
      taking.append(name)
      assert "cli.run(main)" in source and "app.run(" not in source, name
  assert {"train.py", "train_population.py", "evaluate_arena.py", "merge.py",
          "run_dual_system.py", "record_experience.py", "video_pretrain.py"} <= set(taking)


def _run_binary(args, **kwargs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _assert_one_line_error(process, message):
  _, err = process.communicate(timeout=300)
  lines = [line for line in err.splitlines() if line.strip()]
  assert process.returncode == cli.EXIT_USER_ERROR and "Traceback" not in err, err[-3000:]
  assert lines[-1].startswith("error: ") and message in lines[-1], err[-3000:]


def test_binaries_end_a_user_error_in_one_line(tmp_path):
  """A value the schema refuses (train) and a game that is not there (record_experience),
  run side by side; both stop before any work."""
  train = _run_binary(["experiments.train", f"--config={CARTPOLE}",
                       f"--workdir={tmp_path / 'run'}", "--config.ppo.gamma=1.5"])
  record = _run_binary(["experiments.record_experience", f"--port={_free_port()}",
                        f"--out_dir={tmp_path / 'rec'}", "--connect_timeout_s=0.3"])
  _assert_one_line_error(train, "config.ppo.gamma=1.5: expected a finite number in (0, 1]")
  _assert_one_line_error(record, "no BonkLink game answered on 127.0.0.1:")
  assert not (tmp_path / "run").exists() and not (tmp_path / "rec").exists()


def test_tools_reading_a_run_name_what_is_missing(tmp_path):
  """What evaluate/record/merge/dual-system binaries call, on a workdir without a run and
  on one without a checkpoint."""
  from mbjax.train import run as run_lib

  with pytest.raises(checkpoint_lib.RunNotFoundError, match="config.json not found"):
    run_lib.restore_trained(str(tmp_path))
  (tmp_path / "config.json").write_text(config_lib.base_config().to_json())
  with pytest.raises(checkpoint_lib.RunNotFoundError, match="no checkpoint under"):
    run_lib.restore_trained(str(tmp_path))


def test_record_experience_without_frames_fails(tmp_path):
  """A game that answers with states but never a frame: nothing recorded is an error."""
  from mbjax.bridge import codec

  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  state = codec.GameState((1.0, 0.0, 2.0), (0.0, 0.0, 0.0), 5.0, 10.0, 0.0, True, False, (),
                          "Gameplay", ())
  packet = codec.encode_packet(codec.encode_state(state))
  process = _run_binary(["experiments.record_experience",
                         f"--port={listener.getsockname()[1]}", f"--out_dir={tmp_path}",
                         "--seconds=1"])
  listener.settimeout(60.0)
  conn, _ = listener.accept()
  deadline = time.monotonic() + 60.0
  while process.poll() is None and time.monotonic() < deadline:
    try:
      conn.sendall(packet)
    except OSError:
      break
    time.sleep(0.02)
  _assert_one_line_error(process, "recorded nothing in 1 s from 127.0.0.1:")
  conn.close()
  listener.close()
  assert os.listdir(tmp_path) == []
