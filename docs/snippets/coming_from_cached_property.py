"""Coming from Django's cached_property: @property over @request_memo.

Run it: `python coming_from_cached_property.py`
"""

from perrequest import request_memo, request_scope

grants = {"alice": {"reports:read"}}  # a stub database


class Directory:  # lives as long as the process, like most services
    @property
    @request_memo  # below @property: once per instance per request
    def admins(self) -> frozenset[str]:
        return frozenset(u for u, g in grants.items() if "admin" in g)


directory = Directory()

if __name__ == "__main__":
    with request_scope():
        assert directory.admins == frozenset()
        grants["bob"] = {"admin"}
        assert directory.admins == frozenset()  # the same within a request
    with request_scope():
        assert directory.admins == {"bob"}  # fresh in the next one
    try:
        request_memo(property(lambda self: 1))  # above @property
    except TypeError as exc:
        assert "put @property above it" in str(exc)
    else:
        raise AssertionError("expected TypeError")
