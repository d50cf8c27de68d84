"""Model-library adapters. ``base`` and ``keymap`` are library-free; ``diffusers_host`` needs
diffusers and transformers; ``comfy_host`` needs ComfyUI on ``sys.path``."""
