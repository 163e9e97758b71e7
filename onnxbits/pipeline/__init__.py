"""The shrink pipeline on top of every stage: load, import, quantize, fine-tune, freeze,
emit, verify, report.

The only package that may import every other one (the CLI sits above it).
"""
