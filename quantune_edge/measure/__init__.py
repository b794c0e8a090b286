"""Stage 5, measure: latency and accuracy on devices, and the reports bench saves."""
