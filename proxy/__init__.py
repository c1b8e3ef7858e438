"""tokenrelay: an authenticating reverse proxy that injects vendor Bearer tokens."""

__version__ = "0.1.0"
