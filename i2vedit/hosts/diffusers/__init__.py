"""diffusers host: SVD through diffusers modules, peft LoRAs, Stability's single-file checkpoint."""
