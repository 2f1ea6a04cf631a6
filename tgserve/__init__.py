"""tgserve: a TGI-compatible text-generation server on any hardware through backend plugins."""
__version__ = "0.1.0"
