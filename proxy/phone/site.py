"""The phone-facing HTTP site: what services_url and directory_url point at (seed 001 line 597).

The core serves the Services menu (/services, a CiscoIPPhoneMenu of what the
plugins offer); plugins mount their own resources beside it.
"""

from twisted.web import resource

from proxy.phone import ciscoxml


def base_url(request) -> str:
    """http://host:port as the phone asked for it (Host header), so links work whatever address it used."""
    host = request.getHeader(b"host")
    if host:
        return "http://" + host.decode("latin-1")
    addr = request.getHost()
    return f"http://{addr.host}:{addr.port}"


class ServicesMenu(resource.Resource):
    isLeaf = True

    def __init__(self, entries):
        super().__init__()
        self.entries = entries  # () -> [(title, path)], asked per request: a reloaded plugin may rename its entry

    def render_GET(self, request):
        request.setHeader(b"Content-Type", ciscoxml.CONTENT_TYPE)
        base = base_url(request)
        entries = self.entries()
        if not entries:
            return ciscoxml.text("Services", "No services are configured.")
        return ciscoxml.menu("Services", [(title, base + path) for title, path in entries])


def build_site_root(entries, resources: dict) -> resource.Resource:
    """`entries`: () -> the Services menu's [(title, path)]."""
    root = resource.Resource()
    root.putChild(b"services", ServicesMenu(entries))
    root.putChild(b"", ServicesMenu(entries))
    for path, child in resources.items():
        root.putChild(path, child)
    return root
