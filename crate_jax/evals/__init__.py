"""Evaluators: each runs sharded like training and returns metrics named '{name}/...'."""
