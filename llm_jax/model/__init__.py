"""The model: pure layer math (layers.py), parameter containers and forward (transformer.py), presets."""
