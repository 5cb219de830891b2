#!/usr/bin/env python3
"""Checks a Mandate task token and a DPoP proof the way an upstream resource server would.

Independent of Mandate's code: every signature, JWK and thumbprint operation is done by
jwcrypto (Debian python3-jwcrypto), the rest with the standard library only. The rules come
from RFC 9068 (JWT access tokens), RFC 9449 (DPoP), RFC 7638 (JWK thumbprints) and
docs/token-profiles.md.

Inputs are what `mandate --output json task start` and `task token --dpop-request` printed;
the keys come from the broker's discovery document and JWKS over HTTP. Prints PASS/FAIL per
check and exits 1 when any check fails.
"""

import argparse
import base64
import hashlib
import json
import sys
import time
import urllib.request

from jwcrypto import jwk, jws, jwt

FAILURES = []

# RFC 9449 leaves the proof's acceptance window to the server; Mandate's is 60 s back, 5 s ahead.
PROOF_MAX_AGE_SECONDS = 60
# Task tokens last 5 min by default and never past their task's deadline (15 min by default).
TOKEN_MAX_LIFETIME_SECONDS = 900


def check(ok, what, detail=""):
    print(("PASS: " if ok else "FAIL: ") + what + (f" ({detail})" if detail and not ok else ""))
    if not ok:
        FAILURES.append(what)
    return ok


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(compact, index):
    """A JSON segment of a compact JWS, decoded WITHOUT verifying anything."""
    return json.loads(b64url_decode(compact.split(".")[index]))


def fetch_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def ath_of(token):
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


def tamper_payload(compact):
    """The same JWS with one base64url character of its payload changed."""
    header, payload, signature = compact.split(".")
    i = len(payload) // 2
    flipped = "B" if payload[i] != "B" else "C"
    return ".".join([header, payload[:i] + flipped + payload[i + 1:], signature])


def verify_token(token, keyset, issuer, audience, spiffe_id):
    """jwcrypto's own verification: signature with the JWKS key named by kid, ES256 only, and
    iss, aud, sub present with the expected values, exp present and not passed."""
    checked = jwt.JWT(jwt=token, key=keyset, algs=["ES256"],
                      check_claims={"iss": issuer, "aud": audience, "sub": spiffe_id,
                                    "exp": None})
    return json.loads(checked.claims)


def verify_proof_signature(proof):
    """Verifies the proof with the public key in its own header; returns (key, claims)."""
    key = jwk.JWK(**segment(proof, 0)["jwk"])
    signed = jws.JWS()
    signed.allowed_algs = ["ES256"]
    signed.deserialize(proof, key=key)
    return key, json.loads(signed.payload)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", required=True, help="the broker's HTTP base URL")
    parser.add_argument("--task-json", required=True)
    parser.add_argument("--token-json", required=True, help="task token with one DPoP proof")
    parser.add_argument("--other-token-json", required=True,
                        help="a token of the same task fetched by another process")
    parser.add_argument("--audience", required=True)
    parser.add_argument("--spiffe-id", required=True)
    parser.add_argument("--scope", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--url", required=True, help="the upstream request URL as given")
    parser.add_argument("--expected-htu", required=True)
    args = parser.parse_args()

    with open(args.task_json) as f:
        task = json.load(f)
    with open(args.token_json) as f:
        token_doc = json.load(f)
    with open(args.other_token_json) as f:
        other_doc = json.load(f)
    token = token_doc["access_token"]
    other_token = other_doc["access_token"]
    now = int(time.time())

    # ---- the broker's published keys ----
    discovery = fetch_json(args.http + "/.well-known/openid-configuration")
    issuer = discovery.get("issuer")
    check(issuer == args.http, "discovery issuer is the URL it was fetched from",
          f"issuer {issuer!r}")
    jwks_doc = fetch_json(discovery["jwks_uri"])
    keyset = jwk.JWKSet.from_json(json.dumps(jwks_doc))
    keys = list(keyset)
    check(len(keys) > 0, f"jwcrypto imported {len(keys)} key(s) from {discovery['jwks_uri']}")
    check(all(not k.has_private for k in keys), "JWKS holds public keys only")
    check(all(k.get("use") == "sig" and k.get("kid") for k in keys),
          "every JWKS key has use=sig and a kid", json.dumps(jwks_doc))

    # ---- the task token (RFC 9068) ----
    header = segment(token, 0)
    check(header.get("typ") == "at+jwt", "token header typ is at+jwt", f"typ {header.get('typ')!r}")
    check(header.get("alg") == "ES256", "token header alg is ES256", f"alg {header.get('alg')!r}")
    kid = header.get("kid")
    check(bool(kid) and keyset.get_key(kid) is not None, "token kid is in the JWKS", f"kid {kid!r}")
    try:
        claims = verify_token(token, keyset, issuer, args.audience, args.spiffe_id)
        check(True, "jwcrypto verified the token signature, iss, aud, sub and exp")
    except Exception as e:  # pylint: disable=broad-except
        check(False, "jwcrypto verified the token signature, iss, aud, sub and exp", repr(e))
        claims = segment(token, 1)  # unverified, only to report the remaining checks
    check(claims.get("iss") == issuer, "iss is the discovery issuer", f"iss {claims.get('iss')!r}")
    check(claims.get("aud") == args.audience, "aud is the requested audience",
          f"aud {claims.get('aud')!r}")
    check(claims.get("sub") == args.spiffe_id, "sub is the workload's SPIFFE ID",
          f"sub {claims.get('sub')!r}")
    check(claims.get("client_id") == args.spiffe_id, "client_id is the workload's SPIFFE ID",
          f"client_id {claims.get('client_id')!r}")
    scope = claims.get("scope")
    check(isinstance(scope, str) and args.scope in scope.split(" "),
          f"scope contains {args.scope}", f"scope {scope!r}")
    exp, iat = claims.get("exp"), claims.get("iat")
    times_ok = isinstance(exp, int) and isinstance(iat, int)
    check(times_ok and exp > now, "exp is in the future", f"exp {exp!r}, now {now}")
    check(times_ok and 0 < exp - iat <= TOKEN_MAX_LIFETIME_SECONDS,
          f"lifetime exp - iat is in (0, {TOKEN_MAX_LIFETIME_SECONDS}] s",
          f"exp {exp!r}, iat {iat!r}")
    check(isinstance(claims.get("jti"), str) and claims["jti"] != "", "jti is present")
    task_claim = claims.get("task") or {}
    check(task_claim.get("id") == task["id"], "task.id is the declared task",
          f"task {task_claim!r}, expected id {task['id']!r}")
    check(task_claim.get("purpose") == task["purpose"], "task.purpose is the declared purpose",
          f"task {task_claim!r}")
    jkt = (claims.get("cnf") or {}).get("jkt")
    check(isinstance(jkt, str) and len(jkt) == 43, "cnf.jkt is an RFC 7638 SHA-256 thumbprint",
          f"cnf {claims.get('cnf')!r}")
    check(token_doc.get("jkt") == jkt, "the CLI's jkt is the token's cnf.jkt",
          f"{token_doc.get('jkt')!r} vs {jkt!r}")
    check(token_doc.get("token_type") == "DPoP", "token_type is DPoP")

    # ---- the DPoP proof for the upstream request (RFC 9449 §4.3, §7) ----
    proofs = token_doc.get("dpop_proofs") or []
    if not check(len(proofs) == 1, "the CLI printed one DPoP proof", json.dumps(proofs)):
        return
    entry = proofs[0]
    check(entry.get("method") == args.method and entry.get("url") == args.url,
          "the proof entry names the request as given", json.dumps(entry))
    proof = entry["proof"]
    proof_header = segment(proof, 0)
    check(proof_header.get("typ") == "dpop+jwt", "proof header typ is dpop+jwt",
          f"typ {proof_header.get('typ')!r}")
    check(proof_header.get("alg") == "ES256", "proof header alg is ES256",
          f"alg {proof_header.get('alg')!r}")
    proof_jwk = proof_header.get("jwk")
    if not check(isinstance(proof_jwk, dict), "proof header carries a jwk"):
        return
    check("d" not in proof_jwk, "proof jwk has no private member d", json.dumps(proof_jwk))
    try:
        proof_key, proof_claims = verify_proof_signature(proof)
        check(not proof_key.has_private, "jwcrypto imported the proof jwk as a public key")
        check(True, "jwcrypto verified the proof signature with its jwk")
    except Exception as e:  # pylint: disable=broad-except
        check(False, "jwcrypto verified the proof signature with its jwk", repr(e))
        return
    thumbprint = proof_key.thumbprint()
    check(thumbprint == jkt, "jwcrypto's RFC 7638 thumbprint of the proof jwk is cnf.jkt",
          f"{thumbprint} vs {jkt}")
    check(proof_claims.get("htm") == args.method, f"htm is {args.method}",
          f"htm {proof_claims.get('htm')!r}")
    check(proof_claims.get("htu") == args.expected_htu,
          "htu is the request URL without its query", f"htu {proof_claims.get('htu')!r}")
    check(proof_claims.get("ath") == ath_of(token), "ath is base64url(SHA-256(token))",
          f"ath {proof_claims.get('ath')!r} vs {ath_of(token)!r}")
    proof_iat = proof_claims.get("iat")
    check(isinstance(proof_iat, int) and abs(proof_iat - now) <= PROOF_MAX_AGE_SECONDS,
          f"proof iat is within {PROOF_MAX_AGE_SECONDS} s of now", f"iat {proof_iat!r}, now {now}")
    jti = proof_claims.get("jti")
    check(isinstance(jti, str) and len(jti) >= 16, "proof jti has at least 16 characters",
          f"jti {jti!r}")

    # ---- negative checks: the verifier above can fail ----
    try:
        verify_token(tamper_payload(token), keyset, issuer, args.audience, args.spiffe_id)
        check(False, "jwcrypto refuses a token with one payload character changed", "accepted")
    except jws.InvalidJWSSignature:
        check(True, "jwcrypto refuses a token with one payload character changed")
    except Exception as e:  # pylint: disable=broad-except
        check(False, "jwcrypto refuses a token with one payload character changed because of "
              "its signature", repr(e))
    try:
        verify_proof_signature(tamper_payload(proof))
        check(False, "jwcrypto refuses a proof with one payload character changed", "accepted")
    except jws.InvalidJWSSignature:
        check(True, "jwcrypto refuses a proof with one payload character changed")
    except Exception as e:  # pylint: disable=broad-except
        check(False, "jwcrypto refuses a proof with one payload character changed because of "
              "its signature", repr(e))
    # Another genuine token of the same task, fetched by another process: valid on its own, but
    # this proof is bound neither to its hash nor to its key.
    try:
        other_claims = verify_token(other_token, keyset, issuer, args.audience, args.spiffe_id)
        check(other_claims.get("task", {}).get("id") == task["id"],
              "jwcrypto verified a second token of the same task")
    except Exception as e:  # pylint: disable=broad-except
        check(False, "jwcrypto verified a second token of the same task", repr(e))
        other_claims = segment(other_token, 1)
    check(other_token != token and proof_claims.get("ath") != ath_of(other_token),
          "the proof's ath does not match another token's hash")
    other_jkt = (other_claims.get("cnf") or {}).get("jkt")
    check(isinstance(other_jkt, str) and thumbprint != other_jkt,
          "the proof's key is not the other token's cnf.jkt (one DPoP key per process)",
          f"{thumbprint} vs {other_jkt}")


if __name__ == "__main__":
    main()
    if FAILURES:
        print(f"dpop_verify: {len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("dpop_verify: all checks passed")
