"""The file adapter and its mirror."""
