"""The method, host-free: SARP, EDM schedules, samplers, attention matching, inversion, matched denoising."""
