"""Quantization numerics in torch: integer ranges, the interpolated fake-quantizer, modules."""
