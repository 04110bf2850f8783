"""Evaluation: quality metrics against dense output, timing, and writing results people can look at."""
