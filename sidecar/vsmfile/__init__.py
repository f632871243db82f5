"""The file adapter: a stock VSM server's session database mirrored through etcd."""
