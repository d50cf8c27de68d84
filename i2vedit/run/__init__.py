"""Orchestration: single stages shared with the nodes, and the whole-video pipeline."""
