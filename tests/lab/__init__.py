"""The local cluster, the stand-in VSM server and the demo."""
