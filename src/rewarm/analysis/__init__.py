"""Analyses of finished runs: loss forecasts (scaling laws, early curves, loss-to-error)."""
