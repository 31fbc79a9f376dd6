"""geokd's shared library. Layers, lowest first (tests/test_layering.py holds them): the core modules here
(errors, config, io, runtime), then geometry/, data/, models/, features/, train/, experiments/."""
