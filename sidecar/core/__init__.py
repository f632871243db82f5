"""The node and its rules: roles, the state machine, decisions as pure functions."""
