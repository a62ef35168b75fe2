"""The one 401 policy and the one origin comparison, as tables: no server, no client.

The requests hook and both httpx flows ask `_after_response` what a 401 means
for the token they sent: keep it, renew it, or renew it and resend the request
once; these tables pin its answers. (Other statuses never reach it: the
adapters' tests show that a 403 or a 500 is returned as it is.)
"""

from __future__ import annotations

import httpx
import pytest

import edrv_auth

API = edrv_auth._ApiOrigin("https://api.example.test")
OURS = "Bearer test-token-ours"


@pytest.mark.parametrize(
    ("answered", "sent", "replayable", "verdict"),
    [
        ("https://api.example.test/v1.1/x", OURS, True, "resend"),
        (httpx.URL("https://api.example.test/v1.1/x"), OURS, True, "resend"),
        ("https://API.example.test:443/v1.1/x", OURS, True, "resend"),  # spelt out
        ("https://api.example.test/v1.1/x", OURS, False, "renew"),  # a generator body
        ("https://api.example.test/v1.1/x", None, True, "keep"),  # header stripped
        ("https://api.example.test/v1.1/x", "Bearer test-token-other", True, "keep"),
        ("https://elsewhere.example.test/v1.1/x", OURS, True, "keep"),  # another origin
        (httpx.URL("https://elsewhere.example.test/"), OURS, False, "keep"),
        ("http://api.example.test/v1.1/x", OURS, True, "keep"),  # another scheme
        ("https://api.example.test:8443/v1.1/x", OURS, True, "keep"),  # another port
        ("not a url", OURS, True, "keep"),
    ],
)
def test_401_policy(
    answered: str | httpx.URL, sent: str | None, replayable: bool, verdict: str
) -> None:
    """Only a 401 on the API's origin, to a request that carried our header, renews the
    token; the request is sent again only if its body can be."""
    assert edrv_auth._after_response(answered, sent, OURS, replayable, API) == verdict


@pytest.mark.parametrize(
    ("url", "same"),
    [
        ("https://api.example.test/", True),
        ("https://api.example.test/v1.1/chargestations?x=1", True),
        ("https://api.example.test:443/", True),
        ("https://api.example.test.evil.test/", False),
        ("https://api.example.test@evil.test/", False),
        ("https://evil.test/https://api.example.test/", False),
        ("http://api.example.test/", False),
        ("https://[::1]/", False),
        ("", False),
    ],
)
def test_origin_comparison(url: str, same: bool) -> None:
    """The one origin comparison, for URLs as strings and as httpx parses them."""
    assert API.matches(url) is same
    if url:
        assert API.matches(httpx.URL(url)) is same


def test_origin_refusal_names_the_origin_only() -> None:
    """A refused URL is shown as scheme, host and port: never its path or query."""
    with pytest.raises(edrv_auth.EdrvAuthError) as info:
        API.check("https://evil.test:8443/steal?token=test-query-canary")
    assert "https://evil.test:8443" in str(info.value)
    assert "test-query-canary" not in str(info.value)
