"""Workflows: the one pipeline (build, extend, evaluate for any data source, serially or on Ray) and the studies that drive it."""
