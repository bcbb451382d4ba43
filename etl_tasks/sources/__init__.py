"""One module per kind of source, each exposing the same small set of functions."""
