"""What a trained network shows: accuracy at any bit-width, linear probes (METHOD.md §4), the
quantization bias of chapter 1, statistics over seeds."""
