"""I2VEdit core: first-frame-guided video editing with Stable Video Diffusion.

Plain torch at module level; the only modules that know a model library are under
``i2vedit.hosts``. Import submodules directly (``from i2vedit.run.pipeline import edit_video``):
importing this package does nothing heavy. The layout is in the README ("Layout").
"""

__version__ = "0.1.0"
