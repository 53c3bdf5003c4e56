"""Offline work, never imported by the serving packages: evaluation, diagnosis, calibration,
value-model training, and what they need (data sets, rewards, scorers, trainers)."""
