"""Evaluation: shipped texts and windows, the held-out KL and other metrics, and retrieval tasks."""
