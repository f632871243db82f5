"""Generated protobuf and gRPC modules of ``thinlinc.ha.v1`` (see sidecar.tools.genproto)."""
