"""Looped models the library, its tests and its demo run: a Huginn-shaped reference model, an Ouro-style one, the demo
model and its tokenizer. Real modules with real weights, kept here (not in ``examples/``) because the library imports
them."""
