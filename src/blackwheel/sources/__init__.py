"""sources: pinned inputs into the cache (fetch), git stores (mirror), bundles, patches."""
