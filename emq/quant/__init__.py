"""Quantizers (METHOD.md §1, §2, §5): DoReFa and the weight bias correction, LSQ, QIL, shift-bit, Double
Rounding, their straight-through helpers, and the registry of schemes by name."""
