"""The fault benchmark's harness on its cheap rows (the training-based rows run in
`python -m experiments.bench_faults`; each fault is also a unit test of its own)."""
from experiments import bench_faults


def test_cheap_faults_are_kept_and_tabulated(tmp_path):
  rows = bench_faults.run(["declined_save", "jpeg_bomb"], str(tmp_path))
  assert [kept for _, _, kept in rows] == [True, True]
  assert rows[0][1] == "raised CheckpointNotSavedError; step 40 restores as first written"
  table = bench_faults.format_rows(rows + [("a fault", "lost it", False)]).splitlines()
  assert table[0].startswith("| fault ") and table[0].endswith("| what happened | data kept |")
  assert table[2].endswith("| kept |") and table[-1].endswith("| lost it | LOST |")


def test_every_fault_has_a_label_and_a_unique_name():
  names = [f.__name__ for f in bench_faults.FAULTS]
  assert len(set(names)) == len(names)
  assert all(f.__doc__ and f.__doc__.strip() for f in bench_faults.FAULTS)


def test_a_fault_that_breaks_the_bench_is_a_lost_row(tmp_path, monkeypatch):
  def broken(ctx):
    """a fault whose check itself fails"""
    raise RuntimeError("boom")

  monkeypatch.setattr(bench_faults, "FAULTS", [broken])
  ((label, happened, kept),) = bench_faults.run([], str(tmp_path))
  assert (label, kept) == ("a fault whose check itself fails", False)
  assert happened == "bench error RuntimeError: boom"
