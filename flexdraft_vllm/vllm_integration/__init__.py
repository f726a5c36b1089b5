"""Everything that touches vLLM internals. Imported lazily from register()."""
