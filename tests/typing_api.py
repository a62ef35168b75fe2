"""Never executed: checked by `mypy --strict` so that the public API's types
(and EdrvAuth's fit with requests' and httpx's auth protocols) cannot drift."""

from __future__ import annotations

import httpx
import requests

from edrv_auth import EdrvAuth, EdrvAuthError, TokenRequestError


def sync_usage() -> None:
    auth = EdrvAuth("test-client-id", "test-client-secret", refresh_margin=60.0, timeout=5.0)
    token: str = auth.get_token()
    requests.get("https://api.edrv.io/v1.1/chargestations", auth=auth, timeout=10)
    with requests.Session() as session:
        session.auth = auth
    with httpx.Client(auth=auth) as client:
        client.get("https://api.edrv.io/v1.1/chargestations")
    auth.clear()
    del token


async def async_usage() -> None:
    auth = EdrvAuth(api_key="test-api-key", cache_dir="edrv-cache")
    token: str = await auth.aget_token()
    async with httpx.AsyncClient(auth=auth) as client:
        await client.get("https://api.edrv.io/v1.1/chargestations")
    del token


def errors() -> None:
    try:
        EdrvAuth()
    except TokenRequestError as exc:
        status: int | None = exc.status_code
        error: str | None = exc.error
        del status, error
    except EdrvAuthError:
        pass
