"""Training under DeepSpeed: options, the objective, teacher targets, data order, engine setup, the loop."""
