"""RFC 8628 against a running tether server, driven by standard libraries:
authlib's OAuth2Session for the token endpoint and PyJWT to verify the
issued access token (iss, aud, exp, alg).

usage: device_flow.py BASE_URL ADMIN_TOKEN JWT_KEY_FILE SHORT_TTL_BASE_URL
SHORT_TTL_BASE_URL is a second server with a short device-code lifetime
(device_code_ttl_s = 1) so expired_token can be produced quickly.
"""

import base64
import sys
import time

import jwt
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.base_client.errors import OAuthError

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

base, admin_token, key_file, short_base = sys.argv[1:5]
admin = {"Authorization": f"Bearer {admin_token}"}


def public_key():
    # Any 32 bytes that are a valid Ed25519 point: use a real key from the OS via the server's rules.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives import serialization

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def authorize(server=base):
    r = requests.post(
        f"{server}/oauth/device_authorization",
        data={"client_id": "tether-agent", "public_key": public_key(), "hostname": "py-device"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    grant = r.json()
    for field in ["device_code", "user_code", "verification_uri", "verification_uri_complete", "expires_in", "interval"]:
        assert field in grant, (field, grant)
    return grant


def token(session, device_code, server=base):
    return session.fetch_token(
        f"{server}/oauth/token", grant_type=DEVICE_GRANT, device_code=device_code, client_id="tether-agent"
    )


def expect_error(session, device_code, error, server=base):
    try:
        token(session, device_code, server)
    except OAuthError as e:
        assert e.error == error, (e.error, error)
        return
    raise AssertionError(f"expected {error}")


session = OAuth2Session(client_id="tether-agent", token_endpoint_auth_method="none")

# pending, then slow_down for polling too fast
grant = authorize()
expect_error(session, grant["device_code"], "authorization_pending")
expect_error(session, grant["device_code"], "slow_down")

# approve, wait out the (raised) interval, get tokens
r = requests.post(f"{base}/api/v1/device/approve", headers=admin, json={"user_code": grant["user_code"], "labels": {"via": "python"}}, timeout=10)
assert r.status_code == 200, r.text
time.sleep(grant["interval"] + 5 + 0.5)
tok = token(session, grant["device_code"])
assert tok["token_type"] == "Bearer" and tok["refresh_token"], tok

# the access token verifies with PyJWT under the published rules
secret = open(key_file, "rb").read()
claims = jwt.decode(
    tok["access_token"],
    secret,
    algorithms=["HS256"],
    audience="tether-agent",
    issuer="tether",
    options={"require": ["exp", "iat", "iss", "aud", "sub"]},
)
assert claims["typ"] == "agent" and claims["sub"] == claims["device_id"] == tok["agent_id"], claims
assert 0 < claims["exp"] - time.time() <= 15 * 60 + 5, claims
# a token from another key or algorithm does not verify
try:
    jwt.decode(tok["access_token"], b"x" * 32, algorithms=["HS256"], audience="tether-agent", issuer="tether")
    raise AssertionError("verified with the wrong key")
except jwt.InvalidSignatureError:
    pass
# the token works on the agent API
r = requests.get(f"{base}/api/v1/agents/self/updates", headers={"Authorization": f"Bearer {tok['access_token']}"}, timeout=10)
assert r.status_code == 204, r.status_code

# access_denied
grant = authorize()
r = requests.post(f"{base}/api/v1/device/deny", headers=admin, json={"user_code": grant["user_code"]}, timeout=10)
assert r.status_code == 200, r.text
expect_error(session, grant["device_code"], "access_denied")

# expired_token, from the server with the short lifetime
grant = authorize(short_base)
time.sleep(grant["expires_in"] + 0.5)
expect_error(session, grant["device_code"], "expired_token", short_base)

# RFC 8628 §3.4: client_id is required on the poll; a wrong one is
# invalid_client, answered 400 (RFC 6749 §5.2: 401 only with WWW-Authenticate)
grant = authorize()
for form, status, error in [
    ({}, 400, "invalid_request"),
    ({"client_id": "someone-else"}, 400, "invalid_client"),
]:
    r = requests.post(
        f"{base}/oauth/token",
        data={"grant_type": DEVICE_GRANT, "device_code": grant["device_code"], **form},
        timeout=10,
    )
    assert (r.status_code, r.json()["error"]) == (status, error), (form, r.status_code, r.text)
    assert "WWW-Authenticate" not in r.headers, r.headers

print("device flow OK")
