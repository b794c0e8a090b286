"""Stage 3, tune: choose the float layers for an accuracy or latency budget and emit the mixed model."""
