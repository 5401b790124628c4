"""Turn the WAN's source of truth (sites/) into each router's files (out/<router>/).

The stages, each one function with plain data in and out:
load (YAML with line numbers) -> validate (schema, then semantics) -> model -> topology
-> render (templates per platform) -> write (atomic) -> check (real tools).
"""
