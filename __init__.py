"""ComfyUI entry point of the I2VEdit node pack.

ComfyUI calls ``comfy_entrypoint``; nothing else happens at import, so importing this file outside
ComfyUI succeeds and loads neither torch models nor ComfyUI modules.
"""


async def comfy_entrypoint():
    from .nodes import I2VEditExtension

    return I2VEditExtension()
