"""Runs of several stages: the steps the demo and the method study run, and the study's statistics."""
