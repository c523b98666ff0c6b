"""Ports: the protocols services use to reach the world, and the values that cross them."""
