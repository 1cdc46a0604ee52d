"""JSON Schemas of the engine header and the arch/tensors reports; shipped as package data."""
