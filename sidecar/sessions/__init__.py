"""Session records: the codec, the epoch-guarded writer, the follower, the copy."""
