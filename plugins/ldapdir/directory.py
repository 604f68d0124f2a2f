"""The directory's phone-facing resources and the plugin object.

/directory            a CiscoIPPhoneInput: first name, last name (alphabetic), number (numeric)
/directory/search     a CiscoIPPhoneDirectory of at most 32 entries, sorted by name; when there are
                      more, an HTTP Refresh header to the next page (SIP firmware has no SoftKeyItem,
                      seed 001 line 607); none -> a CiscoIPPhoneText; LDAP down -> "Directory unavailable"
"""

import re
import time
import urllib.parse

from twisted.application import service
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server
from zope.interface import implementer

from plugins.ldapdir.backends import DirectoryUnavailable, LdapDirectory, LocalDirectory
from proxy.phone import ciscoxml
from proxy.phone.site import base_url
from proxy.plugin import IProxyPlugin, IReloadablePlugin, IServicePlugin, IWebResources

log = Logger()

PAGE = ciscoxml.DIRECTORY_ENTRIES_MAX


def _arg(request, name: str) -> str:
    values = (request.args or {}).get(name.encode())
    if not values:
        return ""
    raw = values[0]
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()  # the phones send Latin-1


class SearchForm(resource.Resource):
    isLeaf = True

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin

    def render_GET(self, request):
        request.setHeader(b"Content-Type", ciscoxml.CONTENT_TYPE)
        return ciscoxml.input_form(self.plugin.config.title, "Enter name or number",
                                   base_url(request) + "/directory/search",
                                   [("First name", "first", "A"), ("Last name", "last", "A"), ("Number", "number", "N")])


class SearchResults(resource.Resource):
    isLeaf = True

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin

    def render_GET(self, request):
        request.setHeader(b"Content-Type", ciscoxml.CONTENT_TYPE)
        first, last, number = _arg(request, "first"), _arg(request, "last"), _arg(request, "number")
        page_text = _arg(request, "page")
        # ASCII digits only ("²".isdigit() is true, int("²") raises), and a page number that fits.
        page = int(page_text) if page_text.isascii() and page_text.isdigit() and len(page_text) <= 6 else 1
        page = max(page, 1)
        title = self.plugin.config.title
        started = time.monotonic()
        d = self.plugin.backend.search(first, last, number)

        def found(entries):
            self.plugin.searched(time.monotonic() - started, ok=True)
            # Never cached by the phone: the next search must ask again.
            request.setHeader(b"Expires", b"-1")
            if not entries:
                return ciscoxml.text(title, "No entries found.")
            entries = [(name, self.plugin.dialable(number)) for name, number in entries]
            pages = (len(entries) + PAGE - 1) // PAGE
            page_no = min(page, pages)
            chunk = entries[(page_no - 1) * PAGE: page_no * PAGE]
            if page_no < pages:
                query = urllib.parse.urlencode({"first": first, "last": last, "number": number, "page": page_no + 1},
                                               encoding="latin-1", errors="replace")
                url = f"{base_url(request)}/directory/search?{query}"
                request.setHeader(b"Refresh", f"{self.plugin.config.page_refresh}; url={url}".encode("latin-1"))
            return ciscoxml.directory(title, f"Page {page_no} of {pages}", chunk)

        def unavailable(failure):
            failure.trap(DirectoryUnavailable)
            self.plugin.searched(time.monotonic() - started, ok=False)
            return ciscoxml.text(title, "Directory unavailable. Please try again later.")

        def broken(failure):
            log.failure("Directory search failed", failure)
            return ciscoxml.text(title, "Directory unavailable. Please try again later.")

        def write(body):
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(body)
                request.finish()

        d.addCallbacks(found, unavailable).addErrback(broken).addCallback(write)
        return server.NOT_DONE_YET


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        self.pool.stop()
        return super().stopService()


@implementer(IProxyPlugin, IWebResources, IServicePlugin, IReloadablePlugin)
class DirectoryPlugin:
    name = "ldapdir"

    def __init__(self, config, context):
        self.context = context
        self.threadpool = ThreadPool(minthreads=0, maxthreads=config.threads, name="ldapdir")
        self.queries = 0
        self.errors = 0
        self.reload(config)

    def reload(self, config) -> None:
        """Every key takes effect for the next search (sipproxy-admin reload): servers, filters, paging, rewrites."""
        self.config = config
        self.threadpool.adjustPoolsize(minthreads=0, maxthreads=config.threads)
        if config.urls:
            self.backend = LdapDirectory(config, self.threadpool, self.context.reactor)
        else:
            self.backend = LocalDirectory(self.context.credentials)
        self._rewrites = [(re.compile(p), r) for p, r in config.number_rewrites]

    def dialable(self, number: str) -> str:
        """A number as the LDAP entry has it -> as the phone dials it (number_rewrites; the first full match)."""
        for pattern, replacement in self._rewrites:
            if pattern.fullmatch(number):
                return pattern.sub(replacement, number, count=1)
        return number

    def searched(self, seconds: float, ok: bool) -> None:
        """Count the search and tell whoever listens (the metrics plugin) as a `directory_search` event."""
        self.queries += 1
        if not ok:
            self.errors += 1
        self.context.emit("directory_search", seconds=seconds, ok=ok)

    def phone_resources(self):
        form = SearchForm(self)
        root = resource.Resource()
        root.putChild(b"", form)
        root.putChild(b"search", SearchResults(self))
        top = _DirectoryRoot(form, root)
        return {b"directory": top}

    def admin_resources(self):
        return {}

    def services_menu(self):
        return [(self.config.title, "/directory")]

    def service(self):
        return _ThreadPoolService(self.threadpool)


class _DirectoryRoot(resource.Resource):
    """/directory is the form; /directory/search the results."""

    def __init__(self, form, children):
        super().__init__()
        self.form = form
        self.children_root = children

    def getChild(self, path, request):
        if path == b"":
            return self.form
        return self.children_root.getChildWithDefault(path, request)

    def render_GET(self, request):
        return self.form.render_GET(request)
