"""Developer tools shipped with the package (stub generation)."""
