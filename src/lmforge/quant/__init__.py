"""Quantization: number formats, quantized linears and the methods that choose their values."""
