#!/usr/bin/python3
"""A SPIFFE Workload API client written from the SPIFFE specifications alone.

It exists to prove that a third-party SPIFFE library works unchanged against mandate-agent, so it
knows nothing about Mandate: the wire format comes from `spiffe_workload.proto` (transcribed from
github.com/spiffe/spiffe standards/workloadapi.proto) compiled with `protoc --python_out` into a
temporary directory, and the calls go through gRPC's generic API (`channel.unary_stream(...)`), so
no gRPC code generator plugin is needed.

Behaviour follows these upstream documents (github.com/spiffe/spiffe, standards/):
  SPIFFE_Workload_Endpoint.md  §3 security header, §4 SPIFFE_ENDPOINT_SOCKET, §6 error codes
  SPIFFE_Workload_API.md       §4.5 mandatory fields, §5 X.509-SVID profile, §6 JWT-SVID profile
  X509-SVID.md                 §2 one URI SAN, §4 constraints, §5 validation
  JWT-SVID.md                  §2 JOSE header, §3 claims, §4 validation

Modes:
  full    the caller has an identity: every RPC, checked against the spec (the driver runs this as
          the registered uid).
  denied  the caller has no identity: the spec's PermissionDenied semantics.

Prints one `PASS:`/`FAIL:` line per check (plus `INFO:` lines) and exits 1 if any check failed,
2 if the client could not run at all.
"""

import argparse
import atexit
import base64
import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

try:
  import grpc
except ImportError:  # pragma: no cover - environment problem, reported plainly
  print("FAIL: python module 'grpc' is missing (Debian package python3-grpcio)")
  sys.exit(2)

try:
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
  from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
  HAVE_CRYPTOGRAPHY = True
except ImportError:
  HAVE_CRYPTOGRAPHY = False

try:
  import jwt  # PyJWT
  HAVE_PYJWT = True
except ImportError:
  HAVE_PYJWT = False

# SPIFFE_Workload_Endpoint.md §3: static metadata on every request, value case sensitive.
SECURITY_HEADER = ("workload.spiffe.io", "true")
# JWT-SVID.md §2.1: the only permitted `alg` values.
JWT_SVID_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
# JWT-SVID.md §2: "Any header not described here ... MUST NOT be included".
JWT_SVID_HEADERS = {"alg", "kid", "typ"}
SERVICE = "/SpiffeWorkloadAPI/"


# --------------------------------------------------------------------------------------------
# Reporting


class Report:
  """Collects PASS/FAIL lines; any FAIL makes the process exit non-zero."""

  def __init__(self):
    self.failures = []
    self.passes = 0

  def check(self, name, ok, detail=""):
    line = f"{'PASS' if ok else 'FAIL'}: {name}"
    if detail:
      line += f" -- {detail}"
    print(line, flush=True)
    if ok:
      self.passes += 1
    else:
      self.failures.append(name)
    return ok

  def info(self, text):
    print(f"INFO: {text}", flush=True)


# --------------------------------------------------------------------------------------------
# Message classes generated from the spec's proto at run time


def load_messages(proto_path):
  """Runs protoc on the transcribed spec proto into a temp dir and imports the result."""
  protoc = shutil.which("protoc")
  if protoc is None:
    raise RuntimeError("protoc not found on PATH (Debian package protobuf-compiler)")
  out_dir = tempfile.mkdtemp(prefix="spiffe-interop-pb-")
  atexit.register(shutil.rmtree, out_dir, True)
  proto_dir, proto_file = os.path.split(os.path.abspath(proto_path))
  cmd = [protoc, f"-I{proto_dir}", f"--python_out={out_dir}", proto_file]
  # struct.proto ships with libprotobuf-dev; protoc usually finds it itself, but say where.
  if os.path.exists("/usr/include/google/protobuf/struct.proto"):
    cmd.insert(2, "-I/usr/include")
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"protoc failed: {result.stderr.strip()}")
  sys.path.insert(0, out_dir)
  module_name = os.path.splitext(proto_file)[0] + "_pb2"
  return __import__(module_name)


# --------------------------------------------------------------------------------------------
# The client library part: what any spec-following SPIFFE library does


class WorkloadApiError(Exception):
  def __init__(self, code, details):
    super().__init__(f"{code.name}: {details}")
    self.code = code
    self.details = details


def endpoint_to_grpc_target(value):
  """Parses an endpoint address per SPIFFE_Workload_Endpoint.md §4 into a gRPC target."""
  url = urllib.parse.urlsplit(value)
  if url.scheme == "unix":
    if url.netloc:
      raise ValueError(f"'{value}': a unix endpoint must not have an authority component")
    if not url.path.startswith("/"):
      raise ValueError(f"'{value}': a unix endpoint needs an absolute socket path")
    if url.query or url.fragment:
      raise ValueError(f"'{value}': a unix endpoint must not have a query or fragment")
    return "unix:" + url.path
  if url.scheme == "tcp":
    if url.path or url.query or url.fragment or url.username or url.password:
      raise ValueError(f"'{value}': a tcp endpoint has only host and port")
    try:
      host = ipaddress.ip_address(url.hostname or "")
    except ValueError:
      raise ValueError(f"'{value}': a tcp endpoint host must be an IP address") from None
    if url.port is None:
      raise ValueError(f"'{value}': a tcp endpoint needs a port")
    return f"[{host}]:{url.port}" if host.version == 6 else f"{host}:{url.port}"
  raise ValueError(f"'{value}': scheme must be unix or tcp")


class WorkloadApiClient:
  """Minimal SPIFFE Workload API client (all five RPCs of the X.509 and JWT profiles)."""

  def __init__(self, pb, address=None, timeout=10.0):
    # SPIFFE_Workload_Endpoint.md §4: explicit configuration first, then the environment.
    address = address or os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    if not address:
      raise ValueError("no endpoint configured and SPIFFE_ENDPOINT_SOCKET is not set")
    self.address = address
    self.pb = pb
    self.timeout = timeout
    self.channel = grpc.insecure_channel(endpoint_to_grpc_target(address))

  def close(self):
    self.channel.close()

  def _metadata(self, header):
    # `header` exists only so the test can exercise the server's rejection of a missing or wrong
    # header; a normal caller always sends SECURITY_HEADER.
    return () if header is None else (header,)

  def _first_of_stream(self, method, request, response_cls, header=SECURITY_HEADER):
    call = self.channel.unary_stream(SERVICE + method,
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=response_cls.FromString)(
                                         request, metadata=self._metadata(header),
                                         timeout=self.timeout)
    try:
      # SPIFFE_Workload_API.md §4.3: the first message comes "as soon as possible".
      return next(call)
    except grpc.RpcError as e:
      raise WorkloadApiError(e.code(), e.details()) from None
    except StopIteration:
      raise WorkloadApiError(grpc.StatusCode.UNKNOWN,
                             "stream ended without a response message") from None
    finally:
      call.cancel()

  def _unary(self, method, request, response_cls, header=SECURITY_HEADER):
    stub = self.channel.unary_unary(SERVICE + method,
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=response_cls.FromString)
    try:
      return stub(request, metadata=self._metadata(header), timeout=self.timeout)
    except grpc.RpcError as e:
      raise WorkloadApiError(e.code(), e.details()) from None

  def fetch_x509_svid(self, header=SECURITY_HEADER):
    return self._first_of_stream("FetchX509SVID", self.pb.X509SVIDRequest(),
                                 self.pb.X509SVIDResponse, header)

  def fetch_x509_bundles(self, header=SECURITY_HEADER):
    return self._first_of_stream("FetchX509Bundles", self.pb.X509BundlesRequest(),
                                 self.pb.X509BundlesResponse, header)

  def fetch_jwt_svid(self, audience, spiffe_id="", header=SECURITY_HEADER):
    request = self.pb.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id)
    return self._unary("FetchJWTSVID", request, self.pb.JWTSVIDResponse, header)

  def fetch_jwt_bundles(self, header=SECURITY_HEADER):
    return self._first_of_stream("FetchJWTBundles", self.pb.JWTBundlesRequest(),
                                 self.pb.JWTBundlesResponse, header)

  def validate_jwt_svid(self, audience, svid, header=SECURITY_HEADER):
    request = self.pb.ValidateJWTSVIDRequest(audience=audience, svid=svid)
    return self._unary("ValidateJWTSVID", request, self.pb.ValidateJWTSVIDResponse, header)


# --------------------------------------------------------------------------------------------
# SPIFFE ID and DER helpers


def trust_domain_id(spiffe_id):
  """spiffe://td/path -> spiffe://td (the SPIFFE ID of the trust domain, used as bundle key)."""
  url = urllib.parse.urlsplit(spiffe_id)
  if url.scheme != "spiffe" or not url.netloc:
    raise ValueError(f"'{spiffe_id}' is not a SPIFFE ID")
  return f"spiffe://{url.netloc}"


def der_tlv(data, offset):
  """Returns (tag, header_length, content_length) of the DER element at `offset`."""
  if offset + 2 > len(data):
    raise ValueError("truncated DER element")
  tag, first = data[offset], data[offset + 1]
  if first < 0x80:
    return tag, 2, first
  count = first & 0x7F
  if count == 0 or count > 4 or offset + 2 + count > len(data):
    raise ValueError("bad DER length")
  return tag, 2 + count, int.from_bytes(data[offset + 2:offset + 2 + count], "big")


def split_der_certificates(blob):
  """Splits concatenated DER certificates (the Workload API's chain and bundle encoding)."""
  certs, offset = [], 0
  while offset < len(blob):
    tag, header, length = der_tlv(blob, offset)
    if tag != 0x30:
      raise ValueError(f"expected a DER SEQUENCE at byte {offset}, found tag 0x{tag:02x}")
    end = offset + header + length
    if end > len(blob):
      raise ValueError(f"DER certificate at byte {offset} runs past the end of the blob")
    certs.append(blob[offset:end])
    offset = end
  return certs


def is_pkcs8(der):
  """True when `der` is a PKCS#8 PrivateKeyInfo: SEQUENCE { INTEGER 0|1, SEQUENCE algId, ... }.

  A SEC1 ECPrivateKey (SEQUENCE { INTEGER 1, OCTET STRING, ... }) or PKCS#1 RSAPrivateKey
  (SEQUENCE { INTEGER 0, INTEGER n, ... }) would be rejected by the second-element test.
  """
  tag, header, _ = der_tlv(der, 0)
  if tag != 0x30:
    return False
  version_tag, version_header, version_len = der_tlv(der, header)
  if version_tag != 0x02 or version_len != 1 or der[header + version_header] not in (0, 1):
    return False
  alg_tag, _, _ = der_tlv(der, header + version_header + version_len)
  return alg_tag == 0x30


def pem_of(der_list):
  out = []
  for der in der_list:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    out.append("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n")
  return "".join(out)


def der_certs_of_pem(text):
  ders, inside, lines = [], False, []
  for line in text.splitlines():
    if line.startswith("-----BEGIN CERTIFICATE-----"):
      inside, lines = True, []
    elif line.startswith("-----END CERTIFICATE-----"):
      inside = False
      ders.append(base64.b64decode("".join(lines)))
    elif inside:
      lines.append(line.strip())
  return ders


def b64url_decode(segment):
  return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def tamper_signature(token):
  """The same token with one bit of its signature flipped."""
  head, body, sig = token.split(".")
  raw = bytearray(b64url_decode(sig))
  raw[len(raw) // 2] ^= 0x01
  return ".".join([head, body, base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")])


# --------------------------------------------------------------------------------------------
# X.509-SVID validation (X509-SVID.md §2-§5), with python3-cryptography


def verify_signed_by(cert, issuer):
  public_key = issuer.public_key()
  if isinstance(public_key, ec.EllipticCurvePublicKey):
    public_key.verify(cert.signature, cert.tbs_certificate_bytes,
                      ec.ECDSA(cert.signature_hash_algorithm))
  elif isinstance(public_key, rsa.RSAPublicKey):
    public_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                      cert.signature_hash_algorithm)
  elif isinstance(public_key, ed25519.Ed25519PublicKey):
    public_key.verify(cert.signature, cert.tbs_certificate_bytes)
  else:
    raise ValueError(f"unsupported issuer key type {type(public_key).__name__}")


def basic_constraints_ca(cert):
  try:
    return cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
  except x509.ExtensionNotFound:
    return None


def within_validity(cert, now):
  return cert.not_valid_before <= now <= cert.not_valid_after


def verify_chain_with_cryptography(chain, anchors):
  """RFC 5280-style path building: leaf -> intermediates -> any bundle certificate.

  python3-cryptography 38 has no path validator, so this walks the path itself: each link's
  signature, every certificate's validity window, and CA:true on every issuer. Raises ValueError
  saying which link failed.
  """
  now = datetime.datetime.utcnow()
  current, intermediates = chain[0], list(chain[1:])
  for depth in range(10):
    if not within_validity(current, now):
      raise ValueError(f"certificate at depth {depth} ({current.subject.rfc4514_string()}) "
                       f"is outside its validity period")
    for anchor in anchors:
      if anchor.subject == current.issuer:
        try:
          verify_signed_by(current, anchor)
        except Exception:  # noqa: BLE001 - any failure means "not this anchor"
          continue
        if basic_constraints_ca(anchor) is not True:
          raise ValueError("the trust anchor that signed the chain is not a CA certificate")
        if not within_validity(anchor, now):
          raise ValueError("the trust anchor is outside its validity period")
        return depth + 1
    next_cert = None
    for candidate in intermediates:
      if candidate.subject == current.issuer:
        try:
          verify_signed_by(current, candidate)
        except Exception:  # noqa: BLE001
          continue
        next_cert = candidate
        break
    if next_cert is None:
      raise ValueError(f"no bundle or chain certificate signs '{current.subject.rfc4514_string()}'"
                       f" (issuer '{current.issuer.rfc4514_string()}')")
    if basic_constraints_ca(next_cert) is not True:
      raise ValueError("an intermediate in the chain is not a CA certificate")
    intermediates.remove(next_cert)
    current = next_cert
  raise ValueError("chain longer than 10 certificates")


def verify_chain_with_openssl(chain_der, bundle_der, report, label):
  """Second, independent path validator: `openssl verify` with the bundle as trust anchors."""
  if shutil.which("openssl") is None:
    report.info(f"{label}: openssl not found; skipping the openssl cross-check")
    return
  work = tempfile.mkdtemp(prefix="spiffe-interop-x509-")
  try:
    paths = {"leaf": chain_der[:1], "untrusted": chain_der[1:], "bundle": bundle_der}
    for name, ders in paths.items():
      with open(os.path.join(work, name + ".pem"), "w") as f:
        f.write(pem_of(ders))
    cmd = ["openssl", "verify", "-partial_chain", "-CAfile", os.path.join(work, "bundle.pem")]
    if chain_der[1:]:
      cmd += ["-untrusted", os.path.join(work, "untrusted.pem")]
    cmd.append(os.path.join(work, "leaf.pem"))
    result = subprocess.run(cmd, capture_output=True, text=True)
    report.check(f"{label}: `openssl verify` accepts the chain against the bundle",
                 result.returncode == 0, (result.stdout + result.stderr).strip().replace("\n", " | "))
  finally:
    shutil.rmtree(work, ignore_errors=True)


def check_openssl_leaf(chain_der, key_der, spiffe_id, report, label):
  """Used only without python3-cryptography: SAN and key match through the openssl CLI."""
  work = tempfile.mkdtemp(prefix="spiffe-interop-x509-")
  try:
    leaf = os.path.join(work, "leaf.pem")
    with open(leaf, "w") as f:
      f.write(pem_of(chain_der[:1]))
    key = os.path.join(work, "key.der")
    with open(key, "wb") as f:
      f.write(key_der)
    san = subprocess.run(["openssl", "x509", "-in", leaf, "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True).stdout
    uris = [p.strip()[4:] for p in san.replace("\n", ",").split(",") if p.strip().startswith("URI:")]
    report.check(f"{label}: leaf has exactly one URI SAN equal to spiffe_id", uris == [spiffe_id],
                 f"URI SANs {uris}")
    cert_pub = subprocess.run(["openssl", "x509", "-in", leaf, "-noout", "-pubkey"],
                              capture_output=True, text=True).stdout
    key_pub = subprocess.run(["openssl", "pkey", "-inform", "DER", "-in", key, "-pubout"],
                             capture_output=True, text=True).stdout
    report.check(f"{label}: private key matches the leaf certificate",
                 bool(cert_pub) and cert_pub == key_pub)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def check_x509_svid(svid, expected_id, report, label):
  """X509-SVID.md checks on one X509SVID message. Returns the parsed bundle certs (DER list)."""
  report.check(f"{label}: all mandatory X509SVID fields are set (Workload API §5.2.1)",
               bool(svid.spiffe_id and svid.x509_svid and svid.x509_svid_key and svid.bundle))
  report.check(f"{label}: spiffe_id is the registered ID", svid.spiffe_id == expected_id,
               f"got '{svid.spiffe_id}', want '{expected_id}'")
  try:
    chain_der = split_der_certificates(svid.x509_svid)
    bundle_der = split_der_certificates(svid.bundle)
  except ValueError as e:
    report.check(f"{label}: x509_svid and bundle are concatenated DER certificates", False, str(e))
    return []
  report.check(f"{label}: x509_svid and bundle are concatenated DER certificates",
               len(chain_der) >= 1 and len(bundle_der) >= 1,
               f"chain {len(chain_der)} cert(s), bundle {len(bundle_der)} cert(s)")
  try:
    pkcs8 = is_pkcs8(svid.x509_svid_key)
  except ValueError:
    pkcs8 = False
  report.check(f"{label}: x509_svid_key is DER PKCS#8 (Workload API §5.1)", pkcs8)

  if not HAVE_CRYPTOGRAPHY:
    report.info("python3-cryptography missing; using the openssl CLI for the X.509 checks")
    check_openssl_leaf(chain_der, svid.x509_svid_key, svid.spiffe_id, report, label)
    verify_chain_with_openssl(chain_der, bundle_der, report, label)
    return bundle_der

  chain = [x509.load_der_x509_certificate(d) for d in chain_der]
  anchors = [x509.load_der_x509_certificate(d) for d in bundle_der]
  leaf = chain[0]

  # X509-SVID.md §2: exactly one URI SAN, equal to the SPIFFE ID.
  try:
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
  except x509.ExtensionNotFound:
    uris = []
  report.check(f"{label}: leaf has exactly one URI SAN and it equals spiffe_id (X509-SVID §2)",
               uris == [svid.spiffe_id], f"URI SANs {uris}")
  # §4.1 / §5.2: leaf is not a CA.
  report.check(f"{label}: leaf basicConstraints cA is false (X509-SVID §4.1, §5.2)",
               basic_constraints_ca(leaf) is not True)
  # §4.3: key usage present, critical, digitalSignature set, no keyCertSign / cRLSign.
  try:
    ku_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    ku = ku_ext.value
    ku_ok = (ku_ext.critical and ku.digital_signature and not ku.key_cert_sign and
             not ku.crl_sign)
    ku_detail = (f"critical={ku_ext.critical} digitalSignature={ku.digital_signature} "
                 f"keyCertSign={ku.key_cert_sign} cRLSign={ku.crl_sign}")
  except x509.ExtensionNotFound:
    ku_ok, ku_detail = False, "no keyUsage extension"
  report.check(f"{label}: leaf keyUsage is critical, digitalSignature, no keyCertSign/cRLSign "
               "(X509-SVID §4.3)", ku_ok, ku_detail)
  # §4.4: EKU SHOULD be present; when present both serverAuth and clientAuth MUST be set.
  try:
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    report.check(f"{label}: leaf extKeyUsage has serverAuth and clientAuth (X509-SVID §4.4)",
                 ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku)
  except x509.ExtensionNotFound:
    report.info(f"{label}: leaf has no extKeyUsage (allowed: X509-SVID §4.4 says SHOULD)")
  # §3.2 / §4.3: bundle certificates are signing certificates.
  for i, anchor in enumerate(anchors):
    try:
      aku = anchor.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
      aku = False
    report.check(f"{label}: bundle certificate {i} is a CA with keyCertSign (X509-SVID §3.2)",
                 basic_constraints_ca(anchor) is True and aku)

  # The private key (PKCS#8, unencrypted) belongs to the leaf.
  try:
    key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    same_public = key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    message = b"spiffe interop proof of possession"
    if isinstance(key, ec.EllipticCurvePrivateKey):
      leaf.public_key().verify(key.sign(message, ec.ECDSA(hashes.SHA256())), message,
                               ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
      leaf.public_key().verify(key.sign(message, padding.PKCS1v15(), hashes.SHA256()), message,
                               padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PrivateKey):
      leaf.public_key().verify(key.sign(message), message)
    report.check(f"{label}: private key matches the leaf (same public key, signature verifies)",
                 same_public, type(key).__name__)
  except Exception as e:  # noqa: BLE001 - report, don't crash
    report.check(f"{label}: private key matches the leaf (same public key, signature verifies)",
                 False, f"{type(e).__name__}: {e}")

  # §5.1: path validation against the trust domain bundle.
  try:
    depth = verify_chain_with_cryptography(chain, anchors)
    report.check(f"{label}: chain verifies against the bundle (X509-SVID §5.1)", True,
                 f"path length {depth}")
  except Exception as e:  # noqa: BLE001
    report.check(f"{label}: chain verifies against the bundle (X509-SVID §5.1)", False, str(e))
  verify_chain_with_openssl(chain_der, bundle_der, report, label)

  # §3.1: a leaf's SPIFFE ID has a path; only signing certificates may name the bare domain.
  report.check(f"{label}: SPIFFE ID path is non-root (X509-SVID §3.1)",
               urllib.parse.urlsplit(svid.spiffe_id).path not in ("", "/"))
  return bundle_der


# --------------------------------------------------------------------------------------------
# The checks


def expect_code(report, name, fn, code):
  try:
    fn()
  except WorkloadApiError as e:
    return report.check(name, e.code == code, f"got {e.code.name}: {e.details}")
  return report.check(name, False, f"call succeeded; want {code.name}")


def wait_for_identity(client, report, wait_seconds):
  """SPIFFE_Workload_Endpoint.md §6: PermissionDenied/Unavailable may be retried with backoff.

  The driver registers the entry just before running us, so an eventually consistent agent may
  answer PermissionDenied for a moment; that is the behaviour the spec anticipates.
  """
  deadline, delay, attempts = time.monotonic() + wait_seconds, 0.2, 0
  while True:
    attempts += 1
    try:
      started = time.monotonic()
      response = client.fetch_x509_svid()
      report.info(f"first FetchX509SVID response after {attempts} attempt(s), "
                  f"{(time.monotonic() - started) * 1000:.0f} ms for the successful call")
      return response
    except WorkloadApiError as e:
      retryable = e.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
      if not retryable or time.monotonic() + delay > deadline:
        raise
      time.sleep(delay)
      delay = min(delay * 2, 2.0)


def run_full(client, args, report):
  expected_id = args.expect_spiffe_id
  td_id = trust_domain_id(expected_id)
  broker_bundle = None
  if args.expect_bundle_pem:
    with open(args.expect_bundle_pem) as f:
      broker_bundle = set(der_certs_of_pem(f.read()))

  # ---- Security header (Workload Endpoint §3, §6) ----
  try:
    x509_response = wait_for_identity(client, report, args.wait_seconds)
  except WorkloadApiError as e:
    report.check("FetchX509SVID returns an X.509-SVID for the registered caller", False, str(e))
    return
  report.check("FetchX509SVID returns an X.509-SVID for the registered caller", True)

  no_header = [
      ("FetchX509SVID", lambda h: client.fetch_x509_svid(header=h)),
      ("FetchX509Bundles", lambda h: client.fetch_x509_bundles(header=h)),
      ("FetchJWTSVID", lambda h: client.fetch_jwt_svid(["interop"], header=h)),
      ("FetchJWTBundles", lambda h: client.fetch_jwt_bundles(header=h)),
      ("ValidateJWTSVID", lambda h: client.validate_jwt_svid("interop", "a.b.c", header=h)),
  ]
  for method, call in no_header:
    expect_code(report, f"{method} without the workload.spiffe.io header fails INVALID_ARGUMENT "
                "(Workload Endpoint §6)", lambda: call(None), grpc.StatusCode.INVALID_ARGUMENT)
  expect_code(report, "FetchX509SVID with 'workload.spiffe.io: TRUE' (wrong case) fails "
              "INVALID_ARGUMENT (Workload Endpoint §3: value is case sensitive)",
              lambda: client.fetch_x509_svid(header=("workload.spiffe.io", "TRUE")),
              grpc.StatusCode.INVALID_ARGUMENT)
  expect_code(report, "FetchX509SVID with 'workload.spiffe.io: false' fails INVALID_ARGUMENT",
              lambda: client.fetch_x509_svid(header=("workload.spiffe.io", "false")),
              grpc.StatusCode.INVALID_ARGUMENT)

  # ---- FetchX509SVID (Workload API §5.2.1) ----
  report.check("X509SVIDResponse has at least one SVID", len(x509_response.svids) >= 1,
               f"{len(x509_response.svids)} SVID(s)")
  hints = [s.hint for s in x509_response.svids if s.hint]
  report.check("X509SVID hints are unique when set (Workload API §5.2.1)",
               len(hints) == len(set(hints)), f"hints {hints}")
  ids = [s.spiffe_id for s in x509_response.svids]
  report.info(f"X.509-SVIDs for: {ids}; default (first) is {ids[:1]}")
  svid_bundle = []
  if x509_response.svids:
    svid_bundle = check_x509_svid(x509_response.svids[0], expected_id, report, "X509-SVID[0]")
  for td, der in x509_response.federated_bundles.items():
    report.check(f"federated_bundles key '{td}' is the SPIFFE ID of a trust domain",
                 td.startswith("spiffe://") and trust_domain_id(td) == td and bool(der))
  if broker_bundle is not None and svid_bundle:
    report.check("X509SVID.bundle holds the same CA certificates as the broker's bundle.pem",
                 set(svid_bundle) == broker_bundle,
                 f"{len(svid_bundle)} vs {len(broker_bundle)} certificate(s)")

  # ---- FetchX509Bundles (Workload API §5.2.2) ----
  try:
    bundles = client.fetch_x509_bundles()
    keys = sorted(bundles.bundles.keys())
    report.check(f"FetchX509Bundles is keyed by the trust domain's SPIFFE ID '{td_id}'",
                 td_id in bundles.bundles, f"keys {keys}")
    if td_id in bundles.bundles:
      der = split_der_certificates(bundles.bundles[td_id])
      report.check("FetchX509Bundles bundle equals the bundle in X509SVID",
                   set(der) == set(svid_bundle), f"{len(der)} certificate(s)")
  except (WorkloadApiError, ValueError) as e:
    report.check("FetchX509Bundles succeeds", False, str(e))

  # ---- FetchJWTSVID (Workload API §6.2.1, JWT-SVID.md) ----
  audiences = ["spiffe://interop.test/reports", "interop-second-audience"]
  token = None
  try:
    jwt_response = client.fetch_jwt_svid(audiences)
    report.check("FetchJWTSVID with an audience list returns at least one JWT-SVID",
                 len(jwt_response.svids) >= 1, f"{len(jwt_response.svids)} SVID(s)")
    if jwt_response.svids:
      first = jwt_response.svids[0]
      report.check("JWTSVID mandatory fields are set and spiffe_id is the registered ID",
                   bool(first.svid) and first.spiffe_id == expected_id,
                   f"spiffe_id '{first.spiffe_id}'")
      token = first.svid
  except WorkloadApiError as e:
    report.check("FetchJWTSVID with an audience list returns at least one JWT-SVID", False, str(e))

  expect_code(report, "FetchJWTSVID without an audience fails INVALID_ARGUMENT "
              "(Workload API §4.5, §6.2.1)", lambda: client.fetch_jwt_svid([]),
              grpc.StatusCode.INVALID_ARGUMENT)
  try:
    only = client.fetch_jwt_svid(audiences[:1], spiffe_id=expected_id)
    report.check("FetchJWTSVID naming the caller's own spiffe_id returns just that ID",
                 [s.spiffe_id for s in only.svids] == [expected_id],
                 f"{[s.spiffe_id for s in only.svids]}")
  except WorkloadApiError as e:
    report.check("FetchJWTSVID naming the caller's own spiffe_id returns just that ID", False,
                 str(e))
  expect_code(report, "FetchJWTSVID naming a SPIFFE ID the caller is not entitled to fails "
              "PERMISSION_DENIED (Workload API §6.2.1)",
              lambda: client.fetch_jwt_svid(audiences[:1], spiffe_id=td_id + "/not/mine"),
              grpc.StatusCode.PERMISSION_DENIED)

  header = claims = None
  if token:
    parts = token.split(".")
    report.check("JWT-SVID uses JWS Compact Serialization (three segments; JWT-SVID §5.1)",
                 len(parts) == 3)
    try:
      header = json.loads(b64url_decode(parts[0]))
      claims = json.loads(b64url_decode(parts[1]))
    except Exception as e:  # noqa: BLE001
      report.check("JWT-SVID header and payload are base64url JSON", False, str(e))
  if header is not None:
    report.check("JWT-SVID alg is one the spec allows (JWT-SVID §2.1)",
                 header.get("alg") in JWT_SVID_ALGS, f"alg {header.get('alg')}")
    report.check("JWT-SVID header has no fields beyond alg/kid/typ (JWT-SVID §2)",
                 set(header) <= JWT_SVID_HEADERS, f"header fields {sorted(header)}")
    report.check("JWT-SVID typ, when set, is JWT or JOSE (JWT-SVID §2.3)",
                 header.get("typ", "JWT") in ("JWT", "JOSE"), f"typ {header.get('typ')}")
  if claims is not None:
    aud = claims.get("aud")
    aud_list = [aud] if isinstance(aud, str) else list(aud or [])
    report.check("JWT-SVID sub is the SPIFFE ID (JWT-SVID §3.1)",
                 claims.get("sub") == expected_id, f"sub {claims.get('sub')}")
    report.check("JWT-SVID aud holds every requested audience (JWT-SVID §3.2)",
                 all(a in aud_list for a in audiences), f"aud {aud}")
    exp = claims.get("exp")
    report.check("JWT-SVID exp is set and in the future (JWT-SVID §3.3)",
                 isinstance(exp, (int, float)) and exp > time.time(), f"exp {exp}")

  # ---- FetchJWTBundles (Workload API §6.2.2) + local verification (§6.3) ----
  jwks = None
  try:
    jwt_bundles = client.fetch_jwt_bundles()
    keys = sorted(jwt_bundles.bundles.keys())
    report.check(f"FetchJWTBundles is keyed by the trust domain's SPIFFE ID '{td_id}'",
                 td_id in jwt_bundles.bundles, f"keys {keys}")
    if td_id in jwt_bundles.bundles:
      jwks = json.loads(jwt_bundles.bundles[td_id])
      jwk_list = jwks.get("keys") if isinstance(jwks, dict) else None
      report.check("JWT bundle is an RFC 7517 JWK Set with at least one key",
                   isinstance(jwk_list, list) and len(jwk_list) >= 1)
      jwk_list = jwk_list or []
      summary = [{"kty": k.get("kty"), "use": k.get("use"), "kid": k.get("kid"),
                  "x5c": "x5c" in k} for k in jwk_list if isinstance(k, dict)]
      report.info(f"JWT bundle keys: {json.dumps(summary)}")
      # A library such as go-spiffe (jwtbundle.Parse -> AddJWTKey) refuses a JWK without kid, so
      # one such entry makes the whole bundle unusable to it.
      report.check("every JWK in the JWT bundle has a kid (JWT-SVID §6.1; go-spiffe rejects the "
                   "whole JWKS otherwise)",
                   all(isinstance(k, dict) and k.get("kid") for k in jwk_list),
                   f"{sum(1 for k in summary if not k['kid'])} of {len(summary)} key(s) lack kid")
      uses = sorted({str(k.get("use")) for k in jwk_list if isinstance(k, dict) and "use" in k})
      report.check("JWT bundle holds only JWT-SVID signing keys, no x509-svid entries "
                   "(Workload API §6.2.2: 'MUST NOT include keys with other uses')",
                   all(u in ("jwt-svid", "sig") for u in uses), f"use values {uses or 'none'}")
  except (WorkloadApiError, ValueError) as e:
    report.check("FetchJWTBundles succeeds with a JSON JWK Set", False, str(e))

  if token and header is not None and jwks is not None:
    if not HAVE_PYJWT or not HAVE_CRYPTOGRAPHY:
      report.check("JWT-SVID signature verifies locally with PyJWT", False,
                   "python3-jwt and python3-cryptography are needed for local verification")
    else:
      kid = header.get("kid")
      matching = [k for k in jwks.get("keys", []) if isinstance(k, dict) and k.get("kid") == kid]
      report.check("the JWT bundle holds the key named by the token's kid", len(matching) == 1,
                   f"kid {kid}")
      key = None
      if matching:
        try:
          key = jwt.PyJWK(matching[0], algorithm=header["alg"]).key
          decoded = jwt.decode(token, key=key, algorithms=[header["alg"]], audience=audiences[0],
                               options={"require": ["exp", "aud", "sub"]})
          report.check("JWT-SVID signature verifies locally with PyJWT and the JWKS key", True,
                       f"sub {decoded.get('sub')}")
        except Exception as e:  # noqa: BLE001
          report.check("JWT-SVID signature verifies locally with PyJWT and the JWKS key", False,
                       f"{type(e).__name__}: {e}")
      if key is not None:
        # The verifier must actually be checking: a flipped signature bit must fail.
        try:
          jwt.decode(tamper_signature(token), key=key, algorithms=[header["alg"]],
                     audience=audiences[0])
          report.check("PyJWT rejects a tampered JWT-SVID (sanity of the local verifier)", False)
        except jwt.PyJWTError as e:
          report.check("PyJWT rejects a tampered JWT-SVID (sanity of the local verifier)",
                       isinstance(e, jwt.InvalidSignatureError), type(e).__name__)

  # ---- ValidateJWTSVID (Workload API §6.2.3) ----
  if token:
    from google.protobuf import json_format
    try:
      validated = client.validate_jwt_svid(audiences[0], token)
      report.check("ValidateJWTSVID returns the token's SPIFFE ID",
                   validated.spiffe_id == expected_id, f"spiffe_id '{validated.spiffe_id}'")
      got = json_format.MessageToDict(validated.claims)
      got_aud = got.get("aud")
      got_aud = [got_aud] if isinstance(got_aud, str) else list(got_aud or [])
      report.check("ValidateJWTSVID claims struct carries sub, aud and exp (Workload API §6.2.3)",
                   got.get("sub") == expected_id and audiences[0] in got_aud and "exp" in got,
                   f"claims keys {sorted(got)}")
      if claims is not None:
        # Struct numbers are doubles; Python compares 1 == 1.0, nested values included.
        report.check("ValidateJWTSVID claims equal the token's payload claims", got == claims,
                     f"token claims {sorted(claims)}")
    except WorkloadApiError as e:
      report.check("ValidateJWTSVID accepts the JWT-SVID for its audience", False, str(e))

    try:
      client.validate_jwt_svid(audiences[0], tamper_signature(token))
      report.check("ValidateJWTSVID rejects a JWT-SVID with a tampered signature", False,
                   "call succeeded")
    except WorkloadApiError as e:
      report.check("ValidateJWTSVID rejects a JWT-SVID with a tampered signature", True,
                   f"{e.code.name}: {e.details}")
    try:
      client.validate_jwt_svid("some-other-audience", token)
      report.check("ValidateJWTSVID rejects an audience not in the token (JWT-SVID §3.2)", False,
                   "call succeeded")
    except WorkloadApiError as e:
      report.check("ValidateJWTSVID rejects an audience not in the token (JWT-SVID §3.2)", True,
                   f"{e.code.name}: {e.details}")
  expect_code(report, "ValidateJWTSVID with an empty audience fails INVALID_ARGUMENT "
              "(Workload API §4.5, §6.2.3)",
              lambda: client.validate_jwt_svid("", token or "a.b.c"),
              grpc.StatusCode.INVALID_ARGUMENT)
  expect_code(report, "ValidateJWTSVID with an empty svid fails INVALID_ARGUMENT "
              "(Workload API §4.5, §6.2.3)", lambda: client.validate_jwt_svid(audiences[0], ""),
              grpc.StatusCode.INVALID_ARGUMENT)


def run_denied(client, report):
  report.info(f"running as uid {os.getuid()} gid {os.getgid()}")
  expect_code(report, "FetchX509SVID for a caller with no identity fails PERMISSION_DENIED "
              "(Workload Endpoint §6, Workload API §5.2.1)", client.fetch_x509_svid,
              grpc.StatusCode.PERMISSION_DENIED)
  expect_code(report, "FetchJWTSVID for a caller with no identity fails PERMISSION_DENIED "
              "(Workload API §6.2.1)", lambda: client.fetch_jwt_svid(["interop"]),
              grpc.StatusCode.PERMISSION_DENIED)
  # The header check comes first whatever the caller's identity.
  expect_code(report, "FetchX509SVID without the header fails INVALID_ARGUMENT for this caller "
              "too", lambda: client.fetch_x509_svid(header=None), grpc.StatusCode.INVALID_ARGUMENT)
  # Bundles and validation for identity-less callers are the implementation's choice (the spec
  # says SHOULD PermissionDenied only "if the client is not entitled"); record what happens.
  for method, call in (("FetchX509Bundles", client.fetch_x509_bundles),
                       ("FetchJWTBundles", client.fetch_jwt_bundles)):
    try:
      call()
      report.info(f"{method} for a caller with no identity: served")
    except WorkloadApiError as e:
      report.info(f"{method} for a caller with no identity: {e.code.name}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("full", "denied"), default="full")
  parser.add_argument("--endpoint", help="overrides SPIFFE_ENDPOINT_SOCKET")
  parser.add_argument("--proto", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "spiffe_workload.proto"))
  parser.add_argument("--expect-spiffe-id", help="the SPIFFE ID the caller is registered for")
  parser.add_argument("--expect-bundle-pem", help="cross-check X.509 bundles against this PEM")
  parser.add_argument("--wait-seconds", type=float, default=45.0,
                      help="how long to retry PermissionDenied/Unavailable at start (full mode)")
  args = parser.parse_args()
  if args.mode == "full" and not args.expect_spiffe_id:
    parser.error("--expect-spiffe-id is required in full mode")

  report = Report()
  try:
    pb = load_messages(args.proto)
    client = WorkloadApiClient(pb, address=args.endpoint)
  except (RuntimeError, ValueError) as e:
    print(f"FAIL: client setup: {e}", flush=True)
    return 2
  report.info(f"endpoint {client.address}; cryptography={HAVE_CRYPTOGRAPHY} pyjwt={HAVE_PYJWT}")
  try:
    if args.mode == "full":
      run_full(client, args, report)
    else:
      run_denied(client, report)
  finally:
    client.close()
  print(f"SUMMARY: {report.passes} passed, {len(report.failures)} failed ({args.mode} mode)",
        flush=True)
  for name in report.failures:
    print(f"  failed: {name}", flush=True)
  return 1 if report.failures else 0


if __name__ == "__main__":
  sys.exit(main())
