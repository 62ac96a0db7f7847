"""Data on the learner's side: the device-resident replay (and, later, episode formats)."""
