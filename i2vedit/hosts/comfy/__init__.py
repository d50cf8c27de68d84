"""ComfyUI host: SVD through ComfyUI's ModelPatcher (needs ComfyUI on ``sys.path``)."""
