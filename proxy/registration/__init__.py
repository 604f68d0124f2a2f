"""Registration: REGISTER processing, the location service, digest authentication, the users."""
