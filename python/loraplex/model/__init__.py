"""Llama-family models: config, weights, modules."""
