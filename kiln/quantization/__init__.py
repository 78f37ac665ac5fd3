"""Weight quantization: RTN, GPTQ, AWQ, SmoothQuant W8A8, FP8, mixed precision, saved format."""
