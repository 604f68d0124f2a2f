"""The proxy core (RFC 3261 section 16): router, hops, targets, forking, stateless forwarding, routes, DNS."""
