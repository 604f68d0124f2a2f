"""What the phones fetch over HTTP: the phone-facing site and Cisco IP Phone XML."""
