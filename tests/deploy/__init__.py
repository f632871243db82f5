"""What ships: packages, the install script, the image and compose, etcd, units."""
