"""sipproxy: a SIP proxy, registrar and redirect server for Cisco 7940/7960 SIP phones."""

__version__ = "0.1.0"
