"""The resource IP: addresses, netlink, ARP/NA announcements, reconciliation."""
