"""Stages: the async components a pipeline is made of."""
