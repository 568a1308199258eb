"""Storage drivers behind one small async interface."""
