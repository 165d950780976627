"""Benchmarks: a resumable grid runner, the paper-reproduction report, kvpress peers, the difficulty
analysis and figures."""
