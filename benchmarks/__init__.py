"""Benchmarks (`make bench`): throughput, attention analysis cost, and quality against a reference GPT."""
