"""The adapter library: its index on disk, shipped artifacts and the predictor that uses it."""
