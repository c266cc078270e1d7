"""docs/serving.md against the code: every error code and type labkit.serving answers with is documented, with
its status; the defaults the page quotes are the code's."""

import re
from pathlib import Path

import pytest

from labkit.engine import SchedulerConfig
from labkit.serving import config, server

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "serving.md").read_text()
SOURCES = {p.name: p.read_text() for p in (REPO / "labkit" / "serving").glob("*.py")}


def _codes_in_code() -> set[str]:
    codes = set()
    for text in SOURCES.values():
        codes |= set(re.findall(r'code="([a-z_]+)"', text))
        codes |= set(re.findall(r'"[a-z_]+": "([a-z_]+)"', text.split("code = {", 1)[1].split("}", 1)[0])) \
            if "code = {" in text else set()
    return codes


def _rows() -> dict[str, tuple[str, str]]:
    """The refusals table: code -> (status, type)."""
    rows = {}
    for status, code, kind in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|\s*`?([a-z_]*)`?\s*\|", DOC, re.M):
        rows[code] = (status, kind or "invalid_request_error")
    return rows


def test_every_error_code_of_the_server_is_documented_with_its_status_and_type():
    codes = _codes_in_code()
    assert {"queue_full", "shutting_down", "invalid_json", "missing_required_parameter"} <= codes  # the scan works
    router_only = {"no_replica", "replica_failed"}
    rows = _rows()
    missing = sorted(codes - set(rows) - router_only)
    assert not missing, f"docs/serving.md does not list {missing}"
    assert all(f"`{code}`" in DOC for code in router_only)
    assert not set(rows) - codes, f"docs/serving.md lists codes the code never uses: {sorted(set(rows) - codes)}"
    for code, (status, kind) in rows.items():
        # the APIError that answers the code has the documented status and type
        for text in SOURCES.values():
            for call in re.findall(r"APIError\((\d{3}),(?:(?!APIError\(|bad_request\(|\n\n).)*?code=\"" + code + '"', text, re.S):
                assert call == status, (code, call, status)
            for call in re.findall(r'type="([a-z_]+)", code="' + code + '"', text):
                assert call == kind, (code, call, kind)


@pytest.mark.parametrize("phrase", [
    f"`--max-queue`\n{config.DEFAULT_MAX_QUEUE}", f"`--max-queue-wait` {config.DEFAULT_MAX_QUEUE_WAIT_S:g} s",
    f"`--max-num-seqs` the engine's ({SchedulerConfig().max_num_seqs})",
    f"`--body-timeout` ({config.DEFAULT_BODY_TIMEOUT_S:g} s)", f"`--max-connections` ({config.DEFAULT_MAX_CONNECTIONS})",
    f"`--header-timeout` ({config.DEFAULT_HEADER_TIMEOUT_S:g} s)",
    f"`--timeout-keep-alive` ({config.DEFAULT_KEEP_ALIVE_TIMEOUT_S:g} s)",
    f"`--timeout-graceful-shutdown` ({config.DEFAULT_SHUTDOWN_GRACE_S:g} s)",
    f"get {server.SHUTDOWN_FLUSH_S:g} s to reach", "`--max-body-bytes` (1 MiB)",
])
def test_the_defaults_quoted_are_the_codes(phrase):
    assert config.DEFAULT_MAX_BODY_BYTES == 1 << 20
    assert " ".join(phrase.split()) in " ".join(DOC.split()), phrase
