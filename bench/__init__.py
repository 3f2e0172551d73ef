"""Benchmarks: each measures gorgon and its baseline in one run, prints a table, writes JSON (and a PNG)."""
