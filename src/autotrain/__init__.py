"""Compatibility names for the documented imports (`from autotrain.project import AutoTrainProject`)."""
