"""A small Redis client on the Twisted reactor: RESP framing (resp.py) and connections (client.py)."""
