"""RFC 9421 request signatures and RFC 9530 Content-Digest.

Vectors and their sources:
- RFC 9421 Appendix B.1.4 (``test-key-ed25519``), B.2 (``test-request``) and B.2.6 (the
  ``sig-b26`` signature base and value; Ed25519 is deterministic, so it must match byte for byte).
- RFC 9421 B.2.1 and B.2.3, verified with ``test-key-rsa-pss`` (B.1.2), and B.2.5, recomputed with
  ``test-shared-secret`` (B.1.5): they exercise the parser (an empty inner list, a nonce) and the
  derived components @path, @query and @authority.
- RFC 9421 section 2.1 and 2.2 component examples.
- RFC 9530 Appendix B examples for Content-Digest.
- The worked example of docs/wire-formats-http.md (fixed seed 00..1f).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.encoding import b64_encode, b64url_decode
from crypto.errors import VerificationError
from crypto.httpsig import (
    DEFAULT_COMPONENTS,
    MAX_FIELD_LENGTH,
    HttpSignatureError,
    SignatureInput,
    content_digest,
    parse_signature,
    sign_request,
    signature_base,
    verify_content_digest,
    verify_request,
)
from crypto.keys import SigningKey, VerifyKey

# -- RFC 9421 Appendix B ------------------------------------------------------------------------

# B.1.4 test-key-ed25519, JWK form ("d" is the seed, "x" the public key) and PEM form
RFC_ED25519_D = "n4Ni-HpISpVObnQMW0wOhCKROaIKqKtW_2ZYb2p9KcU"
RFC_ED25519_X = "JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs"
RFC_ED25519_PRIVATE_PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n"
    b"-----END PRIVATE KEY-----\n"
)
RFC_ED25519_PUBLIC_PEM = (
    b"-----BEGIN PUBLIC KEY-----\n"
    b"MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=\n"
    b"-----END PUBLIC KEY-----\n"
)

# B.1.2 test-key-rsa-pss (public half)
RFC_RSA_PSS_PUBLIC_PEM = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAr4tmm3r20Wd/PbqvP1s2
+QEtvpuRaV8Yq40gjUR8y2Rjxa6dpG2GXHbPfvMs8ct+Lh1GH45x28Rw3Ry53mm+
oAXjyQ86OnDkZ5N8lYbggD4O3w6M6pAvLkhk95AndTrifbIFPNU8PPMO7OyrFAHq
gDsznjPFmTOtCEcN2Z1FpWgchwuYLPL+Wokqltd11nqqzi+bJ9cvSKADYdUAAN5W
Utzdpiy6LbTgSxP7ociU4Tn0g5I6aDZJ7A8Lzo0KSyZYoA485mqcO0GVAdVw9lq4
aOT9v6d+nb4bnNkQVklLQ3fVAvJm+xdDOp9LCNCN48V2pnDOkFV6+U9nV5oyc6XI
2wIDAQAB
-----END PUBLIC KEY-----
"""

# B.1.5 test-shared-secret
RFC_SHARED_SECRET = (
    "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ=="
)

# B.2 test-request: POST /foo?param=Value&Pet=dog HTTP/1.1 with these fields and body
RFC_URL = "https://example.com/foo?param=Value&Pet=dog"
RFC_BODY = b'{"hello": "world"}'
RFC_HEADERS = {
    "Host": "example.com",
    "Date": "Tue, 20 Apr 2021 02:07:55 GMT",
    "Content-Type": "application/json",
    "Content-Digest": (
        "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:"
    ),
    "Content-Length": "18",
}

# B.2.6 (RFC 8792 line wrapping undone)
B26_SIGNATURE_INPUT = (
    'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
    ';created=1618884473;keyid="test-key-ed25519"'
)
B26_SIGNATURE = (
    "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBK"
    "RCw==:"
)
B26_BASE = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" '
    '"content-length");created=1618884473;keyid="test-key-ed25519"'
)

B21_SIGNATURE_INPUT = (
    'sig-b21=();created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z-50gnwp.yemd"'
)
B21_SIGNATURE = (
    "sig-b21=:d2pmTvmbncD3xQm8E9ZV2828BjQWGgiwAaw5bAkgibUopemLJcWDy/lkbbHAve4cRAtx31Iq786U7it"
    "++wgGxbtRxf8Udx7zFZsckzXaJMkA7ChG52eSkFxykJeNqsrWH5S+oxNFlD4dzVuwe8DhTSja8xxbR/Z2cOGdCbzR"
    "72rgFWhzx2VjBqJzsPLMIQKhO4DGezXehhWwE56YCE+O6c0mKZsfxVrogUvA4HELjVKWmAvtl6UnCh8jYzuVG5WS"
    "b/QEVPnP5TmcAnLH1g+s++v6d4s8m0gCw1fV5/SITLq9mhho8K3+7EPYTU8IU1bLhdxO5Nyt8C8ssinQ98Xw9Q==:"
)
B23_SIGNATURE_INPUT = (
    'sig-b23=("date" "@method" "@path" "@query" "@authority" "content-type" "content-digest" '
    '"content-length");created=1618884473;keyid="test-key-rsa-pss"'
)
B23_SIGNATURE = (
    "sig-b23=:bbN8oArOxYoyylQQUU6QYwrTuaxLwjAC9fbY2F6SVWvh0yBiMIRGOnMYwZ/5MR6fb0Kh1rIRASVxFkeGt6"
    "83+qRpRRU5p2voTp768ZrCUb38K0fUxN0O0iC59DzYx8DFll5GmydPxSmme9v6ULbMFkl+V5B1TP/yPViV7KsLNmvK"
    "iLJH1pFkh/aYA2HXXZzNBXmIkoQoLd7YfW91kE9o/CCoC1xMy7JA1ipwvKvfrs65ldmlu9bpG6A9BmzhuzF8Eim5f8"
    "ui9eH8LZH896+QIF61ka39VBrohr9iyMUJpvRX2Zbhl5ZJzSRxpJyoEZAFL2FUo5fTIztsDZKEgM4cUA==:"
)
B23_BASE = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@query": ?param=Value&Pet=dog\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-digest": sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7'
    "BNNyealdVLvRwEmTHWXvJwew==:\n"
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@query" "@authority" "content-type" '
    '"content-digest" "content-length");created=1618884473;keyid="test-key-rsa-pss"'
)
B25_SIGNATURE_INPUT = (
    'sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"'
)
B25_SIGNATURE = "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:"


def rfc_request(signature_input: str, signature: str) -> dict[str, str]:
    return {**RFC_HEADERS, "Signature-Input": signature_input, "Signature": signature}


def test_rfc9421_test_key_ed25519_jwk_and_pem_agree() -> None:
    key = SigningKey(b64url_decode(RFC_ED25519_D))
    assert key.public_key.raw == b64url_decode(RFC_ED25519_X)
    assert SigningKey.from_pem(RFC_ED25519_PRIVATE_PEM).seed() == key.seed()
    assert VerifyKey.from_pem(RFC_ED25519_PUBLIC_PEM) == key.public_key


def test_rfc9421_b26_signature_base_and_value_byte_for_byte() -> None:
    headers = rfc_request(B26_SIGNATURE_INPUT, B26_SIGNATURE)
    sig_input, signature = parse_signature(headers)
    assert sig_input == SignatureInput(
        label="sig-b26",
        components=("date", "@method", "@path", "@authority", "content-type", "content-length"),
        created=1618884473,
        keyid="test-key-ed25519",
        nonce=None,
        alg=None,
        expires=None,
        params_text=B26_SIGNATURE_INPUT.removeprefix("sig-b26="),
    )
    base = signature_base("POST", RFC_URL, headers, sig_input)
    assert base == B26_BASE.encode("ascii")
    key = SigningKey(b64url_decode(RFC_ED25519_D))
    assert key.sign(base) == signature
    assert f"sig-b26=:{b64_encode(key.sign(base))}:" == B26_SIGNATURE
    VerifyKey.from_pem(RFC_ED25519_PUBLIC_PEM).verify(base, signature)


def test_rfc9421_b26_through_verify_request_with_the_rfc_coverage() -> None:
    # the RFC's key id is not a zonex key id, so the key is registered under its zonex id here
    key = SigningKey(b64url_decode(RFC_ED25519_D))
    text = B26_SIGNATURE_INPUT.replace("test-key-ed25519", key.key_id)
    sig_input, _ = parse_signature(rfc_request(text, B26_SIGNATURE))
    base = signature_base("POST", RFC_URL, RFC_HEADERS, sig_input)
    headers = rfc_request(text, f"sig-b26=:{b64_encode(key.sign(base))}:")
    # a Content-Digest that is present is always checked, and zonex needs its sha-256 member
    with pytest.raises(HttpSignatureError) as err:
        verify_request(
            "POST", RFC_URL, headers, RFC_BODY, key.public_key, now=1618884473, required=()
        )
    assert err.value.reason == "malformed"
    headers["Content-Digest"] += ", " + content_digest(RFC_BODY)
    got = verify_request(
        "POST", RFC_URL, headers, RFC_BODY, key.public_key, now=1618884473, required=()
    )
    assert got.components == sig_input.components
    # zonex's own requirement is not met by this coverage
    with pytest.raises(HttpSignatureError) as err:
        verify_request("POST", RFC_URL, headers, RFC_BODY, key.public_key, now=1618884473)
    assert err.value.reason == "components"


@pytest.mark.parametrize(
    ("signature_input", "signature", "base"),
    [
        (B21_SIGNATURE_INPUT, B21_SIGNATURE, None),
        (B23_SIGNATURE_INPUT, B23_SIGNATURE, B23_BASE),
    ],
    ids=["b21-minimal", "b23-full-coverage"],
)
def test_rfc9421_rsa_pss_examples_verify_over_our_signature_base(
    signature_input: str, signature: str, base: str | None
) -> None:
    headers = rfc_request(signature_input, signature)
    sig_input, raw_signature = parse_signature(headers)
    ours = signature_base("POST", RFC_URL, headers, sig_input)
    if base is not None:
        assert ours == base.encode("ascii")
    public = serialization.load_pem_public_key(RFC_RSA_PSS_PUBLIC_PEM)
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(
        raw_signature,
        ours,
        padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64),
        hashes.SHA512(),
    )


def test_rfc9421_b25_hmac_over_our_signature_base() -> None:
    headers = rfc_request(B25_SIGNATURE_INPUT, B25_SIGNATURE)
    sig_input, mac = parse_signature(headers)
    base = signature_base("POST", RFC_URL, headers, sig_input)
    secret = base64.b64decode(RFC_SHARED_SECRET)
    assert hmac.new(secret, base, hashlib.sha256).digest() == mac


def test_rfc9421_b23_parameters_are_kept_as_received() -> None:
    sig_input, _ = parse_signature(rfc_request(B21_SIGNATURE_INPUT, B21_SIGNATURE))
    assert sig_input.components == ()
    assert sig_input.nonce == "b3k2pp5k7z-50gnwp.yemd"
    assert sig_input.params_text == B21_SIGNATURE_INPUT.removeprefix("sig-b21=")


# -- RFC 9530 Content-Digest ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"hello": "world"}', "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"),
        (b"", "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"),
        (b'"hello"', "sha-256=:Wqdirjg/u3J688ejbUlApbjECpiUUtIwT8lY/z81Tno=:"),
        (b'{"title": "New Title"}', "sha-256=:bWopGGNiZtbVgHsG+I4knzfEJpmmmQHf7RHDXA3o1hQ=:"),
    ],
)
def test_rfc9530_content_digest_examples(body: bytes, expected: str) -> None:
    assert content_digest(body) == expected
    verify_content_digest(expected, body)


def test_content_digest_ignores_other_algorithms() -> None:
    sha512 = RFC_HEADERS["Content-Digest"]
    sha256 = content_digest(RFC_BODY)
    verify_content_digest(f"{sha512}, {sha256}", RFC_BODY)
    verify_content_digest(f"{sha256},{sha512}", RFC_BODY)
    verify_content_digest(f"unixsum=?1, md5=:AAAA:;x=1, {sha256}", RFC_BODY)
    verify_content_digest(f"  {sha256}\t", RFC_BODY)


def test_content_digest_of_another_body_is_a_mismatch() -> None:
    with pytest.raises(HttpSignatureError) as err:
        verify_content_digest(content_digest(b"{}"), RFC_BODY)
    assert err.value.reason == "digest_mismatch"


GOOD_SHA256 = "X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="


@pytest.mark.parametrize(
    "value",
    [
        "",
        RFC_HEADERS["Content-Digest"],  # only sha-512
        f"SHA-256=:{GOOD_SHA256}:",  # keys are lowercase
        f"sha-256={GOOD_SHA256}",  # not a byte sequence
        f'sha-256="{GOOD_SHA256}"',
        f"sha-256=:{GOOD_SHA256.rstrip('=')}:",  # unpadded
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPF=:",  # non-canonical last bits
        f"sha-256=:{GOOD_SHA256}:;q=1",  # parameters on the digest
        "sha-256=:AAAA:",  # not 32 bytes
        f"sha-256=:{GOOD_SHA256}:, sha-256=:{GOOD_SHA256}:",  # repeated key
        f"sha-256=:{GOOD_SHA256}:,",
        f"sha-256=:{GOOD_SHA256}: x",
        f"sha-256=:{GOOD_SHA256}",
        "sha-256=:" + "A" * MAX_FIELD_LENGTH + ":",
        "sha-256",
    ],
)
def test_malformed_content_digest(value: str) -> None:
    with pytest.raises(HttpSignatureError) as err:
        verify_content_digest(value, RFC_BODY)
    assert err.value.reason == "malformed"


# -- the zonex profile ------------------------------------------------------------------------

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
URL = "https://exchange.example/v1/zones?kind=tax"
BODY = b'{"description":"tax records","name":"tax"}'


def signed(
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    key: SigningKey = KEY,
    *,
    created: int = NOW,
    nonce: str = "n-0001",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **(extra or {})}
    return {
        **headers,
        **sign_request(method, url, headers, body, key, created=created, nonce=nonce),
    }


def forge(
    params: str,
    *,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    key: SigningKey = KEY,
    headers: Mapping[str, str] | None = None,
    label: str = "sig1",
) -> dict[str, str]:
    """A request signed by ``key`` over an arbitrary Signature-Input member value."""
    fields = {"Content-Digest": content_digest(body), **(headers or {})}
    sig_input, _ = parse_signature(
        {"Signature-Input": f"{label}={params}", "Signature": f"{label}=::"}, label
    )
    base = signature_base(method, url, fields, sig_input)
    return {
        **fields,
        "Signature-Input": f"{label}={params}",
        "Signature": f"{label}=:{b64_encode(key.sign(base))}:",
    }


def zonex_params(
    *, components: str = '"@method" "@target-uri" "content-digest"', **extra: object
) -> str:
    created, keyid = extra.pop("created", NOW), extra.pop("keyid", KEY.key_id)
    text = f'({components});created={created};keyid="{keyid}"'
    for name, value in extra.items():
        text += f";{name}={value}"
    return text


def reason_of(
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    key: VerifyKey = KEY.public_key,
    now: int = NOW,
    **options: Any,
) -> str:
    """The reason :func:`verify_request` refuses this request for."""
    with pytest.raises(HttpSignatureError) as err:
        verify_request(method, url, headers, body, key, now=now, **options)
    return err.value.reason


def test_sign_then_verify_round_trip() -> None:
    headers = signed()
    got = verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW)
    assert got.label == "sig1"
    assert got.components == DEFAULT_COMPONENTS
    assert (got.created, got.keyid, got.nonce, got.alg, got.expires) == (
        NOW,
        KEY.key_id,
        "n-0001",
        "ed25519",
        None,
    )
    assert headers["Signature-Input"] == f"sig1={got.params_text}"


def test_sign_request_wire_format() -> None:
    headers = sign_request("GET", URL, {}, b"", KEY, created=NOW, nonce="abc", label="req")
    assert set(headers) == {"Content-Digest", "Signature-Input", "Signature"}
    assert headers["Content-Digest"] == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    assert headers["Signature-Input"] == (
        f'req=("@method" "@target-uri" "content-digest");created={NOW};nonce="abc"'
        f';keyid="{KEY.key_id}";alg="ed25519"'
    )
    assert headers["Signature"].startswith("req=:") and headers["Signature"].endswith(":")
    verify_request("GET", URL, headers, b"", KEY.public_key, now=NOW, label="req")


DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-formats-http.md"
DOC_CONTENT_DIGEST = "sha-256=:GX7r8sbcnsbbZILKgX6n9ZLADF6Y2d8kt/w+gD76VIw=:"
DOC_SIGNATURE_INPUT = (
    'sig1=("@method" "@target-uri" "content-digest");created=1767225600'
    ';nonce="q8Yd2nV0sLx7TgW1bKc4PzRe"'
    ';keyid="56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c";alg="ed25519"'
)
DOC_SIGNATURE = (
    "sig1=:1waKdtiqeZ0pHPN0axdra271mpbkzJOxMW2xhMM4PQ2Jqc9HKaS+/89k6/te3v0ICaGVYSLB8U4N+4dMV1X"
    "ABQ==:"
)


def test_worked_example_of_the_wire_format_doc() -> None:
    headers = sign_request(
        "POST",
        "https://exchange.example/v1/zones",
        {"Content-Type": "application/json"},
        b'{"description":"tax records","name":"tax"}',
        KEY,
        created=1767225600,
        nonce="q8Yd2nV0sLx7TgW1bKc4PzRe",
    )
    assert KEY.key_id == "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
    assert headers == {
        "Content-Digest": DOC_CONTENT_DIGEST,
        "Signature-Input": DOC_SIGNATURE_INPUT,
        "Signature": DOC_SIGNATURE,
    }
    text = DOC.read_text(encoding="utf-8")
    for value in (DOC_CONTENT_DIGEST, DOC_SIGNATURE_INPUT, DOC_SIGNATURE, KEY.key_id):
        assert value in text


@pytest.mark.parametrize(
    "transform",
    [
        lambda h: {k.lower(): v for k, v in h.items()},
        lambda h: {k.upper(): v for k, v in h.items()},
        lambda h: {**h, "X-Unrelated": "1", "Accept": "*/*"},
        lambda h: {k: f"  {v}\t" for k, v in h.items()},
    ],
    ids=["lowercase-names", "uppercase-names", "extra-headers", "surrounding-whitespace"],
)
def test_verification_tolerates_what_http_may_change(
    transform: Callable[[dict[str, str]], dict[str, str]],
) -> None:
    headers = transform(signed())
    verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("PUT", URL),
        ("post", URL),  # methods are case-sensitive and never normalized
        ("POST", URL.replace("zones", "zone")),
        ("POST", URL.replace("kind=tax", "kind=all")),
        ("POST", URL.replace("?kind=tax", "")),
        ("POST", URL.replace("https", "http")),
        ("POST", URL.replace("exchange.example", "evil.example")),
        ("POST", URL.replace("exchange.example", "exchange.example:443")),
    ],
)
def test_tampered_method_or_target_uri_is_a_bad_signature(method: str, url: str) -> None:
    assert reason_of(signed(), method=method, url=url) == "bad_signature"


def test_tampered_body_is_a_digest_mismatch() -> None:
    assert reason_of(signed(), body=BODY.replace(b"tax", b"tux")) == "digest_mismatch"
    assert reason_of(signed(), body=BODY + b" ") == "digest_mismatch"
    assert reason_of(signed(), body=b"") == "digest_mismatch"


def test_content_digest_swapped_for_the_tampered_body_is_a_bad_signature() -> None:
    tampered = BODY.replace(b"tax", b"tux")
    headers = {**signed(), "Content-Digest": content_digest(tampered)}
    assert reason_of(headers, body=tampered) == "bad_signature"


def test_tampered_signature_byte_is_a_bad_signature() -> None:
    headers = signed()
    _, signature = parse_signature(headers)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    headers["Signature"] = f"sig1=:{b64_encode(flipped)}:"
    assert reason_of(headers) == "bad_signature"
    headers["Signature"] = f"sig1=:{b64_encode(signature[:63])}:"
    assert reason_of(headers) == "bad_signature"


def test_swapped_keyid_is_a_bad_signature() -> None:
    headers = signed()
    # the server looks the key up by keyid: claiming another principal's id gets their key
    headers["Signature-Input"] = headers["Signature-Input"].replace(KEY.key_id, OTHER.key_id)
    assert reason_of(headers, key=OTHER.public_key) == "bad_signature"
    # a key that is not the one named by keyid is refused outright
    assert reason_of(signed(), key=OTHER.public_key) == "bad_signature"
    # another key's signature carried under this key's id
    mine, theirs = signed(), signed(key=OTHER)
    mine["Signature"] = theirs["Signature"]
    assert reason_of(mine) == "bad_signature"


@pytest.mark.parametrize("offset", [-300, -1, 0, 1, 300])
def test_created_within_skew_is_accepted(offset: int) -> None:
    verify_request("POST", URL, signed(created=NOW + offset), BODY, KEY.public_key, now=NOW)


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 86_400, -NOW])
def test_created_outside_skew_is_stale(offset: int) -> None:
    assert reason_of(signed(created=NOW + offset)) == "stale"


def test_max_skew_is_the_callers() -> None:
    headers = signed(created=NOW - 30)
    assert reason_of(headers, max_skew=29) == "stale"
    verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW, max_skew=30)


def test_expires() -> None:
    verify_request("POST", URL, forge(zonex_params(expires=NOW)), BODY, KEY.public_key, now=NOW)
    assert reason_of(forge(zonex_params(created=NOW - 10, expires=NOW - 1))) == "stale"
    params = zonex_params(created=NOW - 10, expires=NOW - 11)
    assert reason_of({**signed(), "Signature-Input": f"sig1={params}"}) == "malformed"


def test_missing_headers() -> None:
    headers = signed()
    assert reason_of({}) == "missing"
    assert reason_of({"Content-Type": "application/json"}) == "missing"
    assert reason_of({k: v for k, v in headers.items() if k != "Signature"}) == "missing"
    assert reason_of({k: v for k, v in headers.items() if k != "Signature-Input"}) == "missing"
    assert reason_of({**headers, "Signature": "  "}) == "missing"
    with pytest.raises(HttpSignatureError) as err:
        parse_signature({})
    assert err.value.reason == "missing"


def test_missing_content_digest_header_is_components() -> None:
    headers = {k: v for k, v in signed().items() if k != "Content-Digest"}
    assert reason_of(headers) == "components"


def test_signature_not_covering_content_digest_is_components() -> None:
    headers = forge(zonex_params(components='"@method" "@target-uri"'))
    assert reason_of(headers) == "components"
    headers = forge(zonex_params(components='"@method" "content-digest"'))
    assert reason_of(headers) == "components"
    headers = forge(zonex_params(components=""))
    assert reason_of(headers) == "components"
    # a caller may relax the requirement; the signature itself is then fine
    headers = forge(zonex_params(components='"@method" "@target-uri"'))
    verify_request(
        "POST", URL, headers, BODY, KEY.public_key, now=NOW, required=("@method", "@target-uri")
    )


def test_covered_header_that_is_absent_is_components() -> None:
    params = zonex_params(components='"@method" "@target-uri" "content-digest" "date"')
    headers = forge(params, headers={"Date": "Thu, 01 Jan 2026 00:00:00 GMT"})
    verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW)
    del headers["Date"]
    assert reason_of(headers) == "components"


def test_unsupported_derived_component_is_components() -> None:
    params = zonex_params(components='"@method" "@target-uri" "content-digest" "@status"')
    headers = {**signed(), "Signature-Input": f"sig1={params}"}
    assert reason_of(headers) == "components"


@pytest.mark.parametrize(
    "alg", ['"rsa-pss-sha512"', '"hmac-sha256"', '"ED25519"', '"ecdsa-p256-sha256"']
)
def test_other_algorithms_are_refused(alg: str) -> None:
    assert reason_of(forge(zonex_params(alg=alg))) == "malformed"


def test_alg_may_be_absent() -> None:
    verify_request("POST", URL, forge(zonex_params()), BODY, KEY.public_key, now=NOW)


def test_unknown_signature_parameters_are_signed_and_kept() -> None:
    headers = forge(zonex_params(tag='"zonex"', nonce='"n"'))
    got = verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW)
    assert got.params_text.endswith(';tag="zonex";nonce="n"')
    headers["Signature-Input"] = headers["Signature-Input"].replace('"zonex"', '"other"')
    assert reason_of(headers) == "bad_signature"


def test_checks_run_in_order() -> None:
    # not covering content-digest is reported before staleness, staleness before the signature
    stale_uncovered = forge(zonex_params(components='"@method"', created=NOW - 1000))
    assert reason_of(stale_uncovered) == "components"
    stale_bad = signed(created=NOW - 1000)
    stale_bad["Signature"] = signed(key=OTHER)["Signature"]
    assert reason_of(stale_bad) == "stale"
    bad_alg_stale = forge(zonex_params(alg='"hmac-sha256"', created=NOW - 1000))
    assert reason_of(bad_alg_stale) == "malformed"
    # the signature is checked before the body
    forged = signed()
    forged["Signature"] = signed(key=OTHER)["Signature"]
    assert reason_of(forged, body=b"other") == "bad_signature"


# -- labels and repeated fields ---------------------------------------------------------------


def with_proxy_signature(headers: dict[str, str]) -> dict[str, str]:
    proxy = forge(zonex_params(keyid=OTHER.key_id), key=OTHER, label="proxy")
    return {
        **headers,
        "Signature-Input": f"{headers['Signature-Input']}, {proxy['Signature-Input']}",
        "Signature": f"{headers['Signature']}, {proxy['Signature']}",
    }


def test_extra_label_is_refused_unless_a_label_is_named() -> None:
    headers = with_proxy_signature(signed())
    assert reason_of(headers) == "malformed"
    got = verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW, label="sig1")
    assert got.label == "sig1"
    proxy = verify_request("POST", URL, headers, BODY, OTHER.public_key, now=NOW, label="proxy")
    assert proxy.keyid == OTHER.key_id
    sig_input, _ = parse_signature(headers, "sig1")
    assert sig_input.keyid == KEY.key_id


def test_named_label_that_is_absent() -> None:
    headers = signed()
    with pytest.raises(HttpSignatureError) as err:
        parse_signature(headers, "sig2")
    assert err.value.reason == "missing"
    half = {**headers, "Signature": headers["Signature"] + ", sig2=:AAAA:"}
    with pytest.raises(HttpSignatureError) as err:
        parse_signature(half, "sig2")
    assert err.value.reason == "malformed"


def test_labels_must_agree() -> None:
    headers = signed()
    headers["Signature"] = headers["Signature"].replace("sig1=", "sig2=", 1)
    assert reason_of(headers) == "malformed"


class RawHeaders(Mapping[str, str]):
    """A multi-valued header mapping like a server framework's: items() yields every line."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self.lines = lines

    def __getitem__(self, key: str) -> str:
        for k, v in self.lines:
            if k.lower() == key.lower():
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.lower() for k, _ in self.lines))

    def __len__(self) -> int:
        return len(set(self))

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        return list(self.lines)


@pytest.mark.parametrize("name", ["Signature", "Signature-Input", "Content-Digest"])
def test_repeated_security_fields_are_refused(name: str) -> None:
    headers = signed()
    assert reason_of({**headers, name.lower(): headers[name]}) == "malformed"
    lines = [*headers.items(), (name.lower(), headers[name])]
    assert reason_of(RawHeaders(lines)) == "malformed"
    verify_request("POST", URL, RawHeaders(list(headers.items())), BODY, KEY.public_key, now=NOW)


def test_starlette_headers_as_the_server_passes_them() -> None:
    datastructures = pytest.importorskip("starlette.datastructures")
    headers = signed()
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    verify_request("POST", URL, datastructures.Headers(raw=raw), BODY, KEY.public_key, now=NOW)
    doubled = datastructures.Headers(raw=[*raw, (b"content-digest", raw[1][1])])
    assert reason_of(doubled) == "malformed"


# -- structured-field syntax ------------------------------------------------------------------

VALID_SIG = "sig1=:" + b64_encode(bytes(64)) + ":"
P = '("@method" "@target-uri" "content-digest")'
K = f'keyid="{KEY.key_id}"'


@pytest.mark.parametrize(
    "signature_input",
    [
        "sig1",  # a bare key is the boolean true, not an inner list
        "sig1=",
        "sig1=:AAAA:",
        f'sig1="{P}"',
        f"sig1={P[:-1]};created=1;{K}",  # unterminated inner list
        f'sig1=("@method""@target-uri");created=1;{K}',
        f"sig1=(@method);created=1;{K}",
        f"sig1=(date);created=1;{K}",  # a token is not a component identifier
        f"sig1={P};created=1.5;{K}",
        f'sig1={P};created="1";{K}',
        f"sig1={P};created=?1;{K}",
        f"sig1={P};created=-1;{K}",
        f"sig1={P};created=1234567890123456;{K}",
        f"sig1={P};created=;{K}",
        f"sig1={P};{K}",
        f"sig1={P};created=1",
        f'sig1={P};created=1;keyid=""',
        f"sig1={P};created=1;keyid={KEY.key_id[:10]}x",  # token keyid
        f"sig1={P};created=1;{K};created=2",
        f"sig1={P};created=1;{K};nonce=7",
        f"sig1={P};created=1;{K};alg=ed25519",
        f"sig1={P};created=1;{K};expires=?0",
        f'sig1=("@method" "@method");created=1;{K}',
        f'sig1=("@signature-params");created=1;{K}',
        f'sig1=("Content-Digest");created=1;{K}',
        f'sig1=("content-digest";sf);created=1;{K}',
        f'sig1=("@query-param";name="Pet");created=1;{K}',
        f'sig1=("a b");created=1;{K}',
        f'sig1=("");created=1;{K}',
        f'sig1=("@");created=1;{K}',
        f'sig1={P};created=1;keyid="k\\x"',
        f'sig1={P};created=1;keyid="k\\"',
        f'sig1={P};created=1;keyid="k\u00e9"',
        f'sig1={P};created=1;keyid="k\x7f"',
        f"Sig1={P};created=1;{K}",
        f"1sig={P};created=1;{K}",
        f"sig1={P};created=1;{K},",
        f"sig1={P};created=1;{K} x",
        f"sig1={P};created=1;{K}x",
        f"sig1={P};created=1;{K};",
        f"sig1={P};created=1;{K};;x",
        f"sig1={P};created=1;{K};X=1",
        f"sig1={P} ;created=1;{K}",
        f"sig1={P};created=1;{K}, sig1={P};created=1;{K}",
        f"sig1={P};created=1;{K} sig2={P};created=1;{K}",
        f"sig1={P};created=1;{K},,sig2={P};created=1;{K}",
        f"=({P});created=1;{K}",
        f"sig1=({P});created=1;{K}",
        f"sig1={P};created=1;{K};x=:AA:",
        f"sig1={P};created=1;{K};x=?2",
        f"sig1={P};created=1;{K};x=-",
        f"sig1={P};created=1;{K};x=@",
        "sig1=(" + '"x" ' * 1100 + f");created=1;{K}",  # longer than MAX_FIELD_LENGTH
        f"sig1={P};created=1;{K}\r\n",
    ],
)
def test_malformed_signature_input(signature_input: str) -> None:
    headers = {"Signature-Input": signature_input, "Signature": VALID_SIG}
    with pytest.raises(HttpSignatureError) as err:
        parse_signature(headers)
    assert err.value.reason == "malformed", err.value


@pytest.mark.parametrize(
    "signature",
    [
        "sig1=AAAA",
        'sig1="AAAA"',
        "sig1=:AAAA",
        "sig1=AAAA:",
        "sig1=:AA:",  # unpadded
        "sig1=:AB==:",  # non-canonical pad bits
        "sig1=:A-_=:",  # base64url alphabet
        "sig1=: AAAA:",
        f"{VALID_SIG};x=1",
        'sig1=("x")',
        "sig1",
        "sig1=?1",
        f"{VALID_SIG}, {VALID_SIG}",
        f"{VALID_SIG}, sig2=:AAAA:",
        VALID_SIG.replace("sig1", "sig2"),
    ],
)
def test_malformed_signature(signature: str) -> None:
    headers = {"Signature-Input": f"sig1={P};created=1;{K}", "Signature": signature}
    with pytest.raises(HttpSignatureError) as err:
        parse_signature(headers)
    assert err.value.reason == "malformed", err.value


def test_structured_field_whitespace_rules() -> None:
    # RFC 8941: spaces may pad an inner list and precede parameters' keys; OWS around commas
    text = f'sig1=(  "@method"   "@target-uri" "content-digest" );created=1; {K}'
    sig_input, _ = parse_signature({"Signature-Input": text, "Signature": VALID_SIG})
    assert sig_input.components == DEFAULT_COMPONENTS
    assert sig_input.params_text == text.removeprefix("sig1=")
    many = {
        "Signature-Input": f"a=();created=1;{K} ,\tsig1={P};created=2;{K}",
        "Signature": f"a=:AAAA:,{VALID_SIG}",
    }
    assert parse_signature(many, "sig1")[0].created == 2


def test_string_escapes_are_decoded() -> None:
    text = f'sig1={P};created=1;{K};nonce="a\\"b\\\\c"'
    sig_input, _ = parse_signature({"Signature-Input": text, "Signature": VALID_SIG})
    assert sig_input.nonce == 'a"b\\c'


@settings(max_examples=300)
@given(st.text(max_size=200), st.text(max_size=120))
def test_parser_fails_only_with_its_own_error(signature_input: str, signature: str) -> None:
    try:
        parse_signature({"Signature-Input": signature_input, "Signature": signature})
    except HttpSignatureError as exc:
        assert exc.reason in ("missing", "malformed")


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from(
            [
                '"@method"',
                '"@target-uri"',
                '"content-digest"',
                '"date"',
                "x",
                ";",
                "=",
                " ",
                ",",
                "(",
                ")",
                ":AAAA:",
                "?1",
                "1",
                "-1",
                '"',
                "\\",
                "sig1",
                "created",
                "keyid",
                '"k"',
            ]
        ),
        max_size=30,
    )
)
def test_parser_fuzz_from_fragments(parts: list[str]) -> None:
    text = "".join(parts)
    try:
        parse_signature({"Signature-Input": text, "Signature": VALID_SIG})
    except HttpSignatureError as exc:
        assert exc.reason in ("missing", "malformed")


# -- signature base components ----------------------------------------------------------------


def base_of(
    url: str, *components: str, method: str = "POST", headers: Mapping[str, str] | None = None
) -> list[str]:
    inner = " ".join(f'"{c}"' for c in components)
    sig_input = SignatureInput(
        "sig1", components, 1, "k", None, None, None, f'({inner});created=1;keyid="k"'
    )
    lines = signature_base(method, url, headers or {}, sig_input).decode("ascii").split("\n")
    assert lines[-1] == f'"@signature-params": ({inner});created=1;keyid="k"'
    return lines[:-1]


def test_rfc9421_derived_component_examples() -> None:
    # RFC 9421 section 2.2, request "POST /path?param=value HTTP/1.1" to www.example.com
    url = "https://www.example.com/path?param=value"
    assert base_of(
        url, "@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path", "@query"
    ) == [
        '"@method": POST',
        '"@target-uri": https://www.example.com/path?param=value',
        '"@authority": www.example.com',
        '"@scheme": https',
        '"@request-target": /path?param=value',
        '"@path": /path',
        '"@query": ?param=value',
    ]
    assert base_of("http://www.example.com/path?param=value", "@scheme") == ['"@scheme": http']
    assert base_of("https://www.example.com/path?param=value&foo=bar&baz=bat%2Dman", "@query") == [
        '"@query": ?param=value&foo=bar&baz=bat%2Dman'
    ]
    assert base_of("https://www.example.com/path?queryString", "@query") == [
        '"@query": ?queryString'
    ]
    assert base_of("https://www.example.com/path", "@query") == ['"@query": ?']


@pytest.mark.parametrize(
    ("url", "authority", "path", "query", "request_target"),
    [
        ("HTTPS://WWW.Example.COM:443/A/b", "www.example.com", "/A/b", "?", "/A/b"),
        ("http://example.com:80", "example.com", "/", "?", "/"),
        ("http://example.com:8080/?", "example.com:8080", "/", "?", "/?"),
        ("https://example.com:80/x?a=1#frag", "example.com:80", "/x", "?a=1", "/x?a=1"),
        ("http://[::1]:80/x", "[::1]", "/x", "?", "/x"),
        ("https://[::1]/x?", "[::1]", "/x", "?", "/x?"),
        (
            "http://example.com/%7Efoo?%41=%42",
            "example.com",
            "/%7Efoo",
            "?%41=%42",
            "/%7Efoo?%41=%42",
        ),
    ],
)
def test_derived_component_normalization(
    url: str, authority: str, path: str, query: str, request_target: str
) -> None:
    assert base_of(url, "@authority", "@path", "@query", "@request-target") == [
        f'"@authority": {authority}',
        f'"@path": {path}',
        f'"@query": {query}',
        f'"@request-target": {request_target}',
    ]


def test_method_is_taken_as_is() -> None:
    assert base_of(URL, "@method", method="post") == ['"@method": post']
    with pytest.raises(HttpSignatureError) as err:
        base_of(URL, "@method", method="PO ST")
    assert err.value.reason == "malformed"


@pytest.mark.parametrize(
    "url", ["https://example.com/a b", "https://example.com/é", "", "https://example.com/\n"]
)
def test_target_uri_must_be_printable_ascii(url: str) -> None:
    with pytest.raises(HttpSignatureError) as err:
        base_of(url, "@target-uri")
    assert err.value.reason == "malformed"


@pytest.mark.parametrize("url", ["/relative/path", "https://user@example.com/"])
def test_authority_that_cannot_be_derived_is_components(url: str) -> None:
    with pytest.raises(HttpSignatureError) as err:
        base_of(url, "@authority")
    assert err.value.reason == "components"


def test_rfc9421_header_field_examples() -> None:
    # RFC 9421 section 2.1; the caller has combined the two Cache-Control lines
    headers = {
        "Host": "www.example.com",
        "Date": "Tue, 20 Apr 2021 02:07:56 GMT",
        "X-OWS-Header": "   Leading and trailing whitespace.   ",
        "Cache-Control": "max-age=60, must-revalidate",
        "Example-Dict": " a=1,    b=2;x=1;y=2,   c=(a   b   c)",
        "X-Empty-Header": "",
    }
    assert base_of(
        URL,
        "host",
        "date",
        "x-ows-header",
        "cache-control",
        "example-dict",
        "x-empty-header",
        headers=headers,
    ) == [
        '"host": www.example.com',
        '"date": Tue, 20 Apr 2021 02:07:56 GMT',
        '"x-ows-header": Leading and trailing whitespace.',
        '"cache-control": max-age=60, must-revalidate',
        '"example-dict": a=1,    b=2;x=1;y=2,   c=(a   b   c)',
        '"x-empty-header": ',
    ]


@pytest.mark.parametrize("value", ['x\n"@method": GET', "x\ry", "x\x00", "caf\u00e9"])
def test_header_values_cannot_forge_base_lines(value: str) -> None:
    with pytest.raises(HttpSignatureError) as err:
        base_of(URL, "x-note", headers={"X-Note": value})
    assert err.value.reason == "malformed"


def test_hand_built_signature_input_must_be_printable() -> None:
    sig_input = SignatureInput("sig1", (), 1, "k", None, None, None, '();keyid="k"\n"@method": GET')
    with pytest.raises(HttpSignatureError) as err:
        signature_base("GET", URL, {}, sig_input)
    assert err.value.reason == "malformed"


# -- signer input checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"label": "Sig1"}, "label"),
        ({"label": ""}, "label"),
        ({"created": -1}, "created"),
        ({"created": True}, "created"),
        ({"nonce": ""}, "nonce"),
        ({"nonce": "a\nb"}, "nonce"),
        ({"nonce": "caf\u00e9"}, "nonce"),
    ],
)
def test_sign_request_refuses_bad_arguments(kwargs: dict[str, object], bad: str) -> None:
    args: dict[str, object] = {"created": NOW, "nonce": "n", **kwargs}
    with pytest.raises(ValueError):
        sign_request("GET", URL, {}, b"", KEY, **args)  # type: ignore[arg-type]


def test_nonce_with_quotes_and_backslashes_round_trips() -> None:
    headers = signed(nonce='a "quoted" \\ nonce')
    got = verify_request("POST", URL, headers, BODY, KEY.public_key, now=NOW)
    assert got.nonce == 'a "quoted" \\ nonce'


def test_errors_belong_to_the_crypto_tree() -> None:
    err = HttpSignatureError("stale")
    assert isinstance(err, VerificationError)
    assert err.reason == "stale" and str(err) == "stale"


# -- properties -------------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
PATH_CHARS = st.sampled_from("abcxyz0123456789-._~%/!$&'()*+,;=:@")


@settings(max_examples=150)
@given(
    method=st.text(alphabet=TCHAR, min_size=1, max_size=10),
    path=st.text(alphabet=PATH_CHARS, max_size=40),
    query=st.none() | st.text(alphabet=PATH_CHARS, max_size=20),
    body=st.binary(max_size=300),
    nonce=st.text(alphabet=PRINTABLE, min_size=1, max_size=40),
    created=st.integers(min_value=0, max_value=10**12),
)
def test_any_signed_request_verifies(
    method: str, path: str, query: str | None, body: bytes, nonce: str, created: int
) -> None:
    url = "https://exchange.example/" + path + ("" if query is None else "?" + query)
    headers = sign_request(method, url, {}, body, KEY, created=created, nonce=nonce)
    got = verify_request(method, url, headers, body, KEY.public_key, now=created)
    assert (got.nonce, got.created) == (nonce, created)


SIGNED = signed()
TARGETS = ["Signature", "Signature-Input", "Content-Digest", "body"]


@settings(max_examples=400)
@given(
    target=st.sampled_from(TARGETS),
    where=st.integers(min_value=0, max_value=10_000),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_flipped_byte_fails(target: str, where: int, mask: int) -> None:
    headers = dict(SIGNED)
    body = BODY
    if target == "body":
        data = bytearray(body)
        data[where % len(data)] ^= mask
        body = bytes(data)
    else:
        data = bytearray(headers[target].encode("latin-1"))
        data[where % len(data)] ^= mask
        headers[target] = data.decode("latin-1")
    with pytest.raises(HttpSignatureError):
        verify_request("POST", URL, headers, body, KEY.public_key, now=NOW)
