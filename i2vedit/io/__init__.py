"""Frames, video files and atomic file writes."""
