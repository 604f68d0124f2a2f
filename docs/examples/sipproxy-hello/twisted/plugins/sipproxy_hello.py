from sipproxy_hello import factory  # noqa: F401  (the dropin: twisted.plugin finds the factory here)
