"""geokd's shared library: configs, data, models, geometry losses, feature store, training loop."""
