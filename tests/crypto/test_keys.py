"""Ed25519 identities: RFC 8032 vectors, key ids, PEM.

Vectors and their sources:
- RFC 8032 section 7.1, TEST 1, 2, 3, 1024 and SHA(abc). The TEST 1024 message is laid out in the
  RFC's own 16-byte lines; since Ed25519 is deterministic, the byte-exact signature match also
  proves the message was transcribed without error.
- RFC 8410 section 10.1 and 10.3 (an Ed25519 public and private key in PEM) and RFC 9421
  Appendix B.1.4 (``test-key-ed25519``), both as published.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519
from hypothesis import given
from hypothesis import strategies as st

from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey, VerifyKey, key_id

TEST_1024_MESSAGE = "".join(
    (
        "08b8b2b733424243760fe426a4b54908",
        "632110a66c2f6591eabd3345e3e4eb98",
        "fa6e264bf09efe12ee50f8f54e9f77b1",
        "e355f6c50544e23fb1433ddf73be84d8",
        "79de7c0046dc4996d9e773f4bc9efe57",
        "38829adb26c81b37c93a1b270b20329d",
        "658675fc6ea534e0810a4432826bf58c",
        "941efb65d57a338bbd2e26640f89ffbc",
        "1a858efcb8550ee3a5e1998bd177e93a",
        "7363c344fe6b199ee5d02e82d522c4fe",
        "ba15452f80288a821a579116ec6dad2b",
        "3b310da903401aa62100ab5d1a36553e",
        "06203b33890cc9b832f79ef80560ccb9",
        "a39ce767967ed628c6ad573cb116dbef",
        "efd75499da96bd68a8a97b928a8bbc10",
        "3b6621fcde2beca1231d206be6cd9ec7",
        "aff6f6c94fcd7204ed3455c68c83f4a4",
        "1da4af2b74ef5c53f1d8ac70bdcb7ed1",
        "85ce81bd84359d44254d95629e9855a9",
        "4a7c1958d1f8ada5d0532ed8a5aa3fb2",
        "d17ba70eb6248e594e1a2297acbbb39d",
        "502f1a8c6eb6f1ce22b3de1a1f40cc24",
        "554119a831a9aad6079cad88425de6bd",
        "e1a9187ebb6092cf67bf2b13fd65f270",
        "88d78b7e883c8759d2c4f5c65adb7553",
        "878ad575f9fad878e80a0c9ba63bcbcc",
        "2732e69485bbc9c90bfbd62481d9089b",
        "eccf80cfe2df16a2cf65bd92dd597b07",
        "07e0917af48bbb75fed413d238f5555a",
        "7a569d80c3414a8d0859dc65a46128ba",
        "b27af87a71314f318c782b23ebfe808b",
        "82b0ce26401d2e22f04d83d1255dc51a",
        "ddd3b75a2b1ae0784504df543af8969b",
        "e3ea7082ff7fc9888c144da2af58429e",
        "c96031dbcad3dad9af0dcbaaaf268cb8",
        "fcffead94f3c7ca495e056a9b47acdb7",
        "51fb73e666c6c655ade8297297d07ad1",
        "ba5e43f1bca32301651339e22904cc8c",
        "42f58c30c04aafdb038dda0847dd988d",
        "cda6f3bfd15c4b4c4525004aa06eeff8",
        "ca61783aacec57fb3d1f92b0fe2fd1a8",
        "5f6724517b65e614ad6808d6f6ee34df",
        "f7310fdc82aebfd904b01e1dc54b2927",
        "094b2db68d6f903b68401adebf5a7e08",
        "d78ff4ef5d63653a65040cf9bfd4aca7",
        "984a74d37145986780fc0b16ac451649",
        "de6188a7dbdf191f64b5fc5e2ab47b57",
        "f7f7276cd419c17a3ca8e1b939ae49e4",
        "88acba6b965610b5480109c8b17b80e1",
        "b7b750dfc7598d5d5011fd2dcc5600a3",
        "2ef5b52a1ecc820e308aa342721aac09",
        "43bf6686b64b2579376504ccc493d97e",
        "6aed3fb0f9cd71a43dd497f01f17c0e2",
        "cb3797aa2a2f256656168e6c496afc5f",
        "b93246f6b1116398a346f1a641f3b041",
        "e989f7914f90cc2c7fff357876e506b5",
        "0d334ba77c225bc307ba537152f3f161",
        "0e4eafe595f6d9d90d11faa933a15ef1",
        "369546868a7f3a45a96768d40fd9d034",
        "12c091c6315cf4fde7cb68606937380d",
        "b2eaaa707b4c4185c32eddcdd306705e",
        "4dc1ffc872eeee475a64dfac86aba41c",
        "0618983f8741c5ef68d3a101e8a3b8ca",
        "c60c905c15fc910840b94c00a0b9d0",
    )
)

# (name, secret key, public key, message, signature), all hex, from RFC 8032 section 7.1
RFC8032 = [
    (
        "TEST 1",
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "TEST 2",
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "TEST 3",
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "TEST 1024",
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        TEST_1024_MESSAGE,
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    (
        "TEST SHA(abc)",
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
        "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]


@pytest.mark.parametrize(
    ("secret", "public", "message", "signature"),
    [v[1:] for v in RFC8032],
    ids=[v[0] for v in RFC8032],
)
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    key = SigningKey(bytes.fromhex(secret))
    msg, sig = bytes.fromhex(message), bytes.fromhex(signature)
    assert key.public_key.raw.hex() == public
    assert key.sign(msg) == sig
    VerifyKey(bytes.fromhex(public)).verify(msg, sig)
    with pytest.raises(VerificationError):
        VerifyKey(bytes.fromhex(public)).verify(msg + b"\x00", sig)


def test_rfc8032_test_1024_message_is_1023_bytes() -> None:
    assert len(bytes.fromhex(TEST_1024_MESSAGE)) == 1023


@given(st.integers(min_value=0, max_value=63), st.integers(min_value=1, max_value=255))
def test_any_flipped_signature_byte_fails(where: int, mask: int) -> None:
    _, _, public, message, signature = RFC8032[2]
    sig = bytearray(bytes.fromhex(signature))
    sig[where] ^= mask
    with pytest.raises(VerificationError):
        VerifyKey(bytes.fromhex(public)).verify(bytes.fromhex(message), bytes(sig))


@pytest.mark.parametrize("length", [0, 63, 65, 128])
def test_signature_of_the_wrong_length_fails(length: int) -> None:
    key = SigningKey(bytes(32))
    with pytest.raises(VerificationError):
        key.public_key.verify(b"m", bytes(length))


def test_key_id_is_sha256_hex_of_the_raw_public_key() -> None:
    for _, secret, public, _, _ in RFC8032:
        raw = bytes.fromhex(public)
        expected = hashlib.sha256(raw).hexdigest()
        assert key_id(raw) == expected
        assert VerifyKey(raw).key_id == expected
        assert SigningKey(bytes.fromhex(secret)).key_id == expected
        assert len(expected) == 64 and expected == expected.lower()
    # RFC 8032 TEST 1's public key, hashed independently (coreutils sha256sum)
    assert key_id(bytes.fromhex(RFC8032[0][2])) == (
        "21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9"
    )


@pytest.mark.parametrize("raw", [b"", bytes(31), bytes(33), bytes(64)])
def test_wrong_lengths_are_refused(raw: bytes) -> None:
    with pytest.raises(EncodingError):
        key_id(raw)
    with pytest.raises(EncodingError):
        VerifyKey(raw)
    with pytest.raises(EncodingError):
        SigningKey(raw)


def test_non_bytes_are_refused() -> None:
    with pytest.raises(EncodingError):
        VerifyKey(bytearray(32))  # type: ignore[arg-type]
    with pytest.raises(EncodingError):
        SigningKey("0" * 32)  # type: ignore[arg-type]


# -- PEM --------------------------------------------------------------------------------------

RFC8410_PUBLIC_PEM = (
    b"-----BEGIN PUBLIC KEY-----\n"
    b"MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    b"-----END PUBLIC KEY-----\n"
)
RFC8410_PRIVATE_PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n"
    b"-----END PRIVATE KEY-----\n"
)
RFC9421_PUBLIC_PEM = (
    b"-----BEGIN PUBLIC KEY-----\n"
    b"MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=\n"
    b"-----END PUBLIC KEY-----\n"
)
RFC9421_PRIVATE_PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n"
    b"-----END PRIVATE KEY-----\n"
)


@pytest.mark.parametrize(
    ("private_pem", "public_pem"),
    [(RFC8410_PRIVATE_PEM, RFC8410_PUBLIC_PEM), (RFC9421_PRIVATE_PEM, RFC9421_PUBLIC_PEM)],
    ids=["rfc8410", "rfc9421"],
)
def test_published_pem_keys_load_and_serialize_identically(
    private_pem: bytes, public_pem: bytes
) -> None:
    key = SigningKey.from_pem(private_pem)
    public = VerifyKey.from_pem(public_pem)
    assert key.public_key == public
    assert key.to_pem() == private_pem
    assert public.to_pem() == public_pem


def test_rfc8410_public_key_bytes() -> None:
    raw = VerifyKey.from_pem(RFC8410_PUBLIC_PEM).raw
    assert raw.hex() == "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"


@given(st.binary(min_size=32, max_size=32))
def test_pem_round_trips(seed: bytes) -> None:
    key = SigningKey(seed)
    again = SigningKey.from_pem(key.to_pem())
    assert again.seed() == seed
    assert again.public_key == key.public_key
    assert VerifyKey.from_pem(key.public_key.to_pem()) == key.public_key
    # readable by OpenSSL-backed tooling
    loaded = serialization.load_pem_private_key(key.to_pem(), password=None)
    assert (
        loaded.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        == key.public_key.raw
    )


def _private_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _unknown_algorithm_pem(pem: bytes, label: bytes) -> bytes:
    """The same DER with the Ed25519 OID 1.3.101.112 changed to an unassigned 1.3.101.117."""
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    der = der.replace(bytes.fromhex("06032b6570"), bytes.fromhex("06032b6575"))
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, base64.b64encode(der), label)


OTHER_KEYS = {
    "x25519": x25519.X25519PrivateKey.generate(),
    "ed448": ed448.Ed448PrivateKey.generate(),
    "ec-p256": ec.generate_private_key(ec.SECP256R1()),
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=1024),
}

# RFC 9421 B.1.3 test-key-ecc-p256 in SEC1 form, as published
RFC9421_EC_PRIVATE_PEM = b"""-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFKbhfNZfpDsW43+0+JjUr9K+bTeuxopu653+hBaXGA7oAoGCCqGSM49
AwEHoUQDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lfw0EkjqF7xB4FivAxzic30tMM
4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==
-----END EC PRIVATE KEY-----
"""


@pytest.mark.parametrize(
    "pem",
    [
        *(_private_pem(k) for k in OTHER_KEYS.values()),
        RFC9421_EC_PRIVATE_PEM,
        _unknown_algorithm_pem(RFC9421_PRIVATE_PEM, b"PRIVATE KEY"),
        RFC9421_PUBLIC_PEM,
        SigningKey(bytes(32)).to_pem().replace(b"MC4C", b"MC4D"),
        b"",
        b"not a pem",
        b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
        SigningKey(bytes(32)).to_pem()[:-30],
    ],
    ids=[
        *OTHER_KEYS,
        "rfc9421-ec-sec1",
        "unknown-oid",
        "public",
        "bad-der",
        "empty",
        "text",
        "empty-body",
        "truncated",
    ],
)
def test_signing_key_from_pem_refuses_other_keys(pem: bytes) -> None:
    with pytest.raises(EncodingError):
        SigningKey.from_pem(pem)


def test_encrypted_private_key_is_refused() -> None:
    plain = serialization.load_pem_private_key(SigningKey.generate().to_pem(), password=None)
    pem = plain.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(EncodingError):
        SigningKey.from_pem(pem)


@pytest.mark.parametrize(
    "pem",
    [
        *(_public_pem(k) for k in OTHER_KEYS.values()),
        _unknown_algorithm_pem(RFC9421_PUBLIC_PEM, b"PUBLIC KEY"),
        RFC9421_PRIVATE_PEM,
        b"",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ],
    ids=[*OTHER_KEYS, "unknown-oid", "private", "empty", "bad-der"],
)
def test_verify_key_from_pem_refuses_other_keys(pem: bytes) -> None:
    with pytest.raises(EncodingError):
        VerifyKey.from_pem(pem)


def test_repr_never_shows_the_seed() -> None:
    key = SigningKey(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key)
    assert key.key_id[:16] in repr(key)
    assert key.key_id[:16] in repr(key.public_key)


def test_generated_keys_differ_and_work() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    assert a.seed() != b.seed()
    a.public_key.verify(b"msg", a.sign(b"msg"))
    with pytest.raises(VerificationError):
        b.public_key.verify(b"msg", a.sign(b"msg"))


def test_verify_keys_compare_by_value() -> None:
    raw = bytes.fromhex(RFC8032[0][2])
    assert VerifyKey(raw) == VerifyKey(raw)
    assert hash(VerifyKey(raw)) == hash(VerifyKey(raw))
    assert VerifyKey(raw) != raw
    assert len({VerifyKey(raw), VerifyKey(raw)}) == 1
