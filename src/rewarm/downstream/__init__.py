"""Downstream evaluation with lm-evaluation-harness: offline task data (`tasks`) and the
evaluation itself with choice-level probability mass (`harness`)."""
