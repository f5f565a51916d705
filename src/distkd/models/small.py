"""Placeholder; replaced by the demo model family."""
