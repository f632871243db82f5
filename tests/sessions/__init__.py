"""Session records, the durable copy, the mirror."""
