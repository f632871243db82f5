"""gRPC and HTTP, as clients see them."""
