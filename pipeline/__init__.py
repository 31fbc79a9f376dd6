"""geokd's shared library. Layers, lowest first (tests/test_layering.py holds them):
the core modules here (errors, config, io, runtime, models, teacher, geometry, stats, steps), then data/, features/, train/."""
