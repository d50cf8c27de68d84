"""The 16 transformer positions of the SVD UNet, named for both model libraries (method.md §0.1).

Each position holds one spatial and one temporal self-attention layer. Positions are listed in
forward order, which is also ComfyUI's ``transformer_index``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionPosition:
    """One transformer position: where its two self-attention layers live in each library."""

    index: int  # 0..15 in forward order
    level: str  # "down", "mid" or "up"
    pos: int  # counter within the level (down 0-5, mid 0, up 0-8)
    downscale: int  # latent resolution divided by this: 1, 2, 4 or 8
    diffusers_prefix: str
    comfy_prefix: str
    comfy_patch_key: tuple[str, int, int]  # key of ComfyUI's attn1 replace patches

    @property
    def diffusers_spatial(self) -> str:
        return f"{self.diffusers_prefix}.transformer_blocks.0.attn1"

    @property
    def diffusers_temporal(self) -> str:
        return f"{self.diffusers_prefix}.temporal_transformer_blocks.0.attn1"

    @property
    def comfy_spatial(self) -> str:
        return f"{self.comfy_prefix}.transformer_blocks.0.attn1"

    @property
    def comfy_temporal(self) -> str:
        return f"{self.comfy_prefix}.time_stack.0.attn1"


def _build() -> tuple[AttentionPosition, ...]:
    out: list[AttentionPosition] = []
    for block in range(3):  # down_blocks.0-2 carry attention; down_blocks.3 does not
        for j in range(2):
            comfy_id = 3 * block + j + 1
            out.append(
                AttentionPosition(
                    len(out),
                    "down",
                    2 * block + j,
                    2**block,
                    f"down_blocks.{block}.attentions.{j}",
                    f"input_blocks.{comfy_id}.1",
                    ("input", comfy_id, 0),
                )
            )
    out.append(
        AttentionPosition(len(out), "mid", 0, 8, "mid_block.attentions.0", "middle_block.1", ("middle", 0, 0))
    )
    for block in range(1, 4):  # up_blocks.0 has no attention
        for j in range(3):
            comfy_id = 3 * block + j
            out.append(
                AttentionPosition(
                    len(out),
                    "up",
                    3 * (block - 1) + j,
                    2 ** (3 - block),
                    f"up_blocks.{block}.attentions.{j}",
                    f"output_blocks.{comfy_id}.1",
                    ("output", comfy_id, 0),
                )
            )
    return tuple(out)


POSITIONS: tuple[AttentionPosition, ...] = _build()
