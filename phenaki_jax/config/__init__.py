"""The config schema by concern: sections (loop, mesh, input, ...) composed per job in schema.py."""
