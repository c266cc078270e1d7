"""Where a client sends its requests and which key goes with them: server URLs, whether an address is this
machine, and the API key a client may send to it (a key set in the environment never leaves for another host
unless asked)."""

from __future__ import annotations

import os

API_KEY_ENV = "LABKIT_API_KEY"
API_KEY_ENVS = (API_KEY_ENV, "OPENAI_API_KEY")  # where clients look for a key, in this order


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def server_url(host: str, port: int) -> str:
    """http://host:port, with an IPv6 address in brackets. `host` may also be a URL, `http(s)://host[:port]`, whose
    port (if it has one) wins over `port`; anything else (a path, `host:port`, spaces) is a one-line ValueError."""
    import ipaddress
    from urllib.parse import urlsplit

    text, scheme = host.strip(), "http"
    usage = "a host name, an IP address or a URL like http://127.0.0.1:8000"
    if "://" in text:
        parts = urlsplit(text)
        try:
            url_port = parts.port
        except ValueError:
            raise ValueError(f"--host {host!r}: the port is not in 0..65535; expected {usage}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query \
                or parts.fragment or parts.username is not None:
            raise ValueError(f"--host {host!r}: expected {usage}")
        scheme, text, port = parts.scheme, parts.hostname, url_port or port
    text = text.removeprefix("[").removesuffix("]")
    if not text or any(c in text for c in "/?#@[] \t"):
        raise ValueError(f"--host {host!r}: expected {usage}")
    if ":" in text:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"--host {host!r}: give the port with --port, or a URL like http://{text}") from None
        return f"{scheme}://[{text}]:{port}"
    return f"{scheme}://{text}:{port}"


def is_loopback(url: str) -> bool:
    """Whether a URL's host is this machine (localhost or a loopback address); names are not resolved."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(url: str, given: str | None = None, use_env_key: bool = False) -> tuple[str | None, str | None]:
    """(key, note): the key to send to `url`, and why a key set in the environment is held back (else None).

    `given` always goes; else the first key set among API_KEY_ENVS, to loopback hosts only unless use_env_key,
    so a key exported for one provider never reaches whatever host a client is pointed at.
    """
    if given:
        return given, None
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            if use_env_key or is_loopback(url):
                return os.environ[name], None
            return None, (f"${name} is set but not sent to {url}, which is not a loopback address (pass "
                          f"--api-key, or --use-env-key to send it)")
    return None, None


__all__ = ["API_KEY_ENV", "API_KEY_ENVS", "auth_headers", "server_url", "is_loopback", "api_key_for"]
