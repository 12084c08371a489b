"""Peer tools the benchmarks compare urm-jax with, each in its own venv, driven as subprocesses."""
