"""Model-library adapters: ``comfy`` needs ComfyUI on ``sys.path``; ``diffusers`` needs diffusers and
transformers. Nothing else in ``i2vedit`` imports a model library."""
