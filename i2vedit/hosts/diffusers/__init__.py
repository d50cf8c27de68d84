"""diffusers host: SVD through diffusers modules, motion LoRAs as a branch on the one UNet, Stability's single-file checkpoint."""
