"""The output share's machinery: backward rules, the adjoint and kernel TFLite models, reference ops."""
