"""SARPPerturb: smooth-area random perturbation of the frames that go into EDM inversion."""

from __future__ import annotations

from comfy_api.latest import io

from ..i2vedit.method import sarp

CATEGORY = "I2VEdit"


class SARPPerturb(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SARPPerturb",
            display_name="SARP Perturb (I2VEdit)",
            category=f"{CATEGORY}/inversion",
            description="Adds a little noise to exactly flat areas (letterbox bars, flat backgrounds, padding) "
            "so that EDM inversion gives editable, Gaussian-like noise there. Feed its IMAGE to the inversion only.",
            inputs=[
                io.Image.Input("frames", tooltip="Source frames (an IMAGE batch) that will be inverted."),
                io.Float.Input(
                    "noise_scale",
                    default=sarp.NOISE_SCALE,
                    min=0.0,
                    max=0.1,
                    step=0.001,
                    tooltip="Standard deviation of the noise in [-1, 1] pixel units. The paper uses 0.005.",
                ),
                io.Float.Input(
                    "threshold",
                    default=sarp.THRESHOLD,
                    min=0.0,
                    max=1.0,
                    step=0.0001,
                    tooltip="A pixel counts as flat when its Sobel gradient (L1, averaged over channels, "
                    "[-1, 1] units) is at most this. 0.001 means exactly constant 3×3 neighbourhoods.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**63 - 1,
                    tooltip="Seed of the noise: same seed, same result.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The frames with their flat areas perturbed."),
                io.Mask.Output(display_name="smooth_mask", tooltip="Where noise was added (1 = flat area)."),
            ],
        )

    @classmethod
    def execute(cls, frames, noise_scale: float, threshold: float, seed: int) -> io.NodeOutput:
        out, mask = sarp.sarp(frames, seed=seed, noise_scale=noise_scale, threshold=threshold)
        return io.NodeOutput(out, mask.float())
