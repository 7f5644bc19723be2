"""release: finished wheels (wheelhouse), their manifests and provenance, the index, publishing."""
