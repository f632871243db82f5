"""The guides' commands and links, run as written."""
