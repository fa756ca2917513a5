"""Benchmarks behind `voxc bench` (thin scripts in bench/ call these too)."""
