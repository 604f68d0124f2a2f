"""[plugins.ldapdir]: checked at startup; every key named in errors."""

import os

import attrs

from proxy.errors import ConfigError


@attrs.frozen
class DirectoryConfig:
    urls: tuple[str, ...] = ()  # empty: the directory is the local users' display names
    base_dn: str = ""
    bind_dn: str = ""
    bind_password: str = ""
    search_filter: str = "(objectClass=person)"  # ANDed with what the phone user typed
    name_attributes: tuple[str, ...] = ("displayName", "cn")
    number_attributes: tuple[str, ...] = ("telephoneNumber", "mobile", "ipPhone")
    first_name_attribute: str = "givenName"
    last_name_attribute: str = "sn"
    size_limit: int = 200
    timeout: float = 3.0
    starttls: bool = False
    ca_file: str = ""
    threads: int = 4
    title: str = "Directory"
    page_refresh: int = 5  # seconds before a page with more results loads the next (Refresh header); 0: manual
    # Numbers as stored in LDAP -> numbers the phones can dial: [pattern, replacement] pairs (Python regular
    # expressions, full match), the first that matches is used. E.g. ["\\+4930(\\d+)", "9\\1"].
    number_rewrites: tuple[tuple[str, str], ...] = ()


_KEYS = {a.name for a in attrs.fields(DirectoryConfig)}


def parse(table: dict, path: str) -> DirectoryConfig:
    def error(key, reason):
        return ConfigError(path, f"plugins.ldapdir.{key}", reason)

    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise error(unknown[0], "unknown key")
    d = DirectoryConfig()
    values = {}
    for field in attrs.fields(DirectoryConfig):
        if field.name not in table:
            continue
        value = table[field.name]
        default = getattr(d, field.name)
        if field.name == "number_rewrites":
            value = _rewrites(value, error)
        elif field.name == "page_refresh":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise error(field.name, "must be a whole number of seconds, 0 for manual paging")
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise error(field.name, "must be a list of non-empty strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise error(field.name, "must be true or false")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise error(field.name, "must be a number greater than 0")
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise error(field.name, "must be a whole number, 1 or more")
        elif not isinstance(value, str):
            raise error(field.name, "must be a string")
        values[field.name] = value
    config = DirectoryConfig(**values)
    for url in config.urls:
        if not url.startswith(("ldap://", "ldaps://")):
            raise error("urls", f"{url!r} must start with ldap:// or ldaps://")
    if config.urls and not config.base_dn:
        raise error("base_dn", "required when urls are set")
    if config.bind_dn and not config.bind_password:
        raise error("bind_password", "required with bind_dn")
    if config.ca_file and not os.path.isfile(config.ca_file):
        raise error("ca_file", f"no such file: {config.ca_file}")
    if not (config.search_filter.startswith("(") and config.search_filter.endswith(")")):
        raise error("search_filter", "must be an LDAP filter in parentheses")
    return config


def _rewrites(value, error) -> tuple[tuple[str, str], ...]:
    import re

    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
                                              for r in value):
        raise error("number_rewrites", 'must be a list of ["pattern", "replacement"] pairs')
    for pattern, replacement in value:
        try:
            re.compile(pattern).sub(replacement, "")
        except (re.error, IndexError) as e:
            raise error("number_rewrites", f"{pattern!r} -> {replacement!r}: {e}") from None
    return tuple((p, r) for p, r in value)
