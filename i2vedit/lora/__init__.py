"""Motion LoRAs, host-free: target linears, the safetensors file format, the training loop."""
