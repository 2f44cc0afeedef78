"""Generators of small models and checkpoints for tests, benchmarks and demos."""
