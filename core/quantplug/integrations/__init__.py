"""Bridges between quantplug and other libraries (each module imports its library on first use)."""
