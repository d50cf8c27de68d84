"""The demo's synthetic video: no file, no download (the ``demo`` command, the GPU bench, tests)."""

from __future__ import annotations

import torch

DEMO_SIZE = (128, 192)
DEMO_FRAMES = 10


def moving_square(
    frames: int = DEMO_FRAMES, size: tuple[int, int] = DEMO_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured square moving over a flat background (so SARP has work), and where the square is.

    Returns the IMAGE (frames, H, W, 3) and a bool (frames, H, W) of the square's pixels.
    """
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    background = torch.tensor([0.55, 0.7, 0.85])
    side = h // 3
    out, masks = [], []
    for f in range(frames):
        top, left = (
            h // 3 + int(6 * torch.sin(torch.tensor(f / 3.0))),
            8 + f * (w - side - 16) // max(frames - 1, 1),
        )
        inside = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
        checker = (((yy - top) // 6 + (xx - left) // 6) % 2).float()
        obj = torch.stack([0.9 * checker + 0.1, 0.3 * checker + 0.2, 0.1 + 0 * checker], -1)
        frame = torch.where(inside[..., None], obj, background.expand(h, w, 3))
        out.append(frame)
        masks.append(inside)
    return torch.stack(out), torch.stack(masks)


def demo_video(
    frames: int = DEMO_FRAMES, size: tuple[int, int] = DEMO_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moving_square``'s video, and its first frame with the square recoloured (the edit)."""
    video, masks = moving_square(frames, size)
    edited = video[:1].clone()
    edited[0][masks[0]] = edited[0][masks[0]][:, [2, 1, 0]] * 0.6 + torch.tensor([0.0, 0.3, 0.4])  # recolour
    return video, edited.clamp(0, 1)
