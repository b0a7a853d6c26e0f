"""Runs last (by name): no token any test used appears in any sidecar log of this run; only the
first 8 hex digits of its SHA-256 may (DESIGN.md §7)."""
import hashlib

from conftest import _LOGS, ALL_TOKENS


def test_no_token_in_any_sidecar_log():
    logs = [(label, path) for label, path in _LOGS if "sidecar" in label and path.exists()]
    tokens = [t for t in ALL_TOKENS if len(t) >= 12]
    assert logs, "no sidecar log was recorded: run this with the rest of the suite"
    assert tokens, "no token was recorded: run this with the rest of the suite"
    leaks = []
    digests_seen = 0
    for label, path in logs:
        text = path.read_text(errors="replace")
        for token in tokens:
            if token in text:
                leaks.append(f"{label}: {path} contains a token starting {token[:6]}")
            if hashlib.sha256(token.encode()).hexdigest()[:8] in text:
                digests_seen += 1
    assert not leaks, "\n".join(leaks)
    assert digests_seen > 0, "denials should name tokens by their digest prefix"
    print(f"\nchecked {len(tokens)} tokens against {len(logs)} sidecar logs")
