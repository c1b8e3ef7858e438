"""Vendor tokens: how to obtain them (grants) and how to keep them (cache)."""
