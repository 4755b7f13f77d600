"""Data: the mini world, dataset folders, real-dataset layouts and the split of a domain."""
