"""Replay without the old data: the model's own generations as a replay source (`rewarm replay`)."""
