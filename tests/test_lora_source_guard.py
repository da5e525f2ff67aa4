"""The SSRF guard's judgement of addresses and URLs (no network: resolvers are injected)."""

from __future__ import annotations

import ipaddress

import pytest

from errors import UserError
from net.url_guard import Guard, allowed_private_origins, embedded_ipv4, is_public, origin


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared (CGNAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),  # AWS metadata over IPv6
        ("ff0e::1", False),
        # IPv4-mapped and IPv4-compatible
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("::127.0.0.1", False),
        ("::10.0.0.1", False),
        # NAT64, well-known prefix and local-use prefix
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a9fe:a9fe", False),  # 169.254.169.254
        ("64:ff9b::808:808", True),
        ("64:ff9b:1::808:808", False),
        # 6to4
        ("2002:7f00:1::1", False),
        ("2002:a00:1::", False),
        ("2002:808:808::1", True),
        # Teredo: server 65.54.227.120; client (obfuscated) 127.0.0.1, then 8.8.8.8
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),
        ("2001:0:7f00:1:8000:63bf:f7f7:f7f7", False),  # server 127.0.0.1
        # gaps a review found: IPv4-translated (SIIT), site-local, a metadata service on a public address
        ("::ffff:0:7f00:1", False),
        ("::ffff:0:a9fe:a9fe", False),
        ("::ffff:0:808:808", True),
        ("fec0::1", False),
        ("168.63.129.16", False),  # Azure's wire server
    ],
)
def test_is_public(address, public):
    assert is_public(address) is public


def test_embedded_ipv4():
    assert [str(a) for a in embedded_ipv4(ipaddress.ip_address("64:ff9b::7f00:1"))] == ["127.0.0.1"]
    assert embedded_ipv4(ipaddress.ip_address("2001:4860:4860::8888")) is None


def guard(answers: list[str], calls: list, **kw) -> Guard:
    def resolve(host, port):
        calls.append((host, port))
        return answers

    return Guard(resolve, **kw)


def test_every_address_of_a_host_must_be_public():
    calls = []
    with pytest.raises(UserError, match=r"Refusing to fetch 'https://mixed.test/x\?…': its host is not a public"):
        guard(["8.8.8.8", "10.0.0.1"], calls).check("https://mixed.test/x?sig=secret")
    assert calls == [("mixed.test", 443)]
    target = guard(["8.8.8.8", "2001:4860:4860::8888"], calls).check("http://ok.test:8080/x")
    assert target.addresses == ("8.8.8.8", "2001:4860:4860::8888")
    assert (target.host, target.port, target.host_header) == ("ok.test", 8080, "ok.test:8080")


def test_trusted_hops_and_the_switch_skip_judging_but_still_pin():
    calls = []
    assert guard(["10.0.0.5"], calls).check("http://mirror.test/x", trusted=True).addresses == ("10.0.0.5",)
    assert guard(["10.0.0.5"], calls, allow_private=True).check("http://m.test/x").addresses == ("10.0.0.5",)
    assert len(calls) == 2


@pytest.mark.parametrize("url", ["ftp://x.test/a", "file:///etc/passwd", "http:///nohost", "http://x.test:99999/a"])
def test_only_well_formed_http_urls(url):
    with pytest.raises(UserError, match="Refusing to fetch"):
        guard(["8.8.8.8"], []).check(url)


def test_an_unresolvable_host_gets_the_same_answer_as_a_private_one():
    """Otherwise the two answers map which internal names exist."""

    def fails(host, port):
        raise OSError("no such host")

    with pytest.raises(UserError) as unresolvable:
        Guard(fails).check("http://gone.test/x")
    with pytest.raises(UserError) as private:
        guard(["10.0.0.1"], []).check("http://gone.test/x")
    assert str(unresolvable.value) == str(private.value)
    with pytest.raises(UserError, match="Refusing"):
        guard(["not-an-address"], []).check("http://odd.test/x")


def test_allowed_private_origins_name_the_operators_own_services_only():
    allowed = allowed_private_origins(" http://Mirror.test:8080 , https://10.0.0.9 ")
    assert allowed == {"http://mirror.test:8080", "https://10.0.0.9:443"}
    check = guard(["10.0.0.5"], [], allowed_origins=allowed).check
    assert check("http://mirror.test:8080/a.safetensors").addresses == ("10.0.0.5",)
    for other in ("http://mirror.test:8081/a", "https://mirror.test:8080/a", "http://other.test/a"):
        with pytest.raises(UserError, match="Refusing"):
            check(other)
    with pytest.raises(RuntimeError, match="ALLOWED_PRIVATE_ORIGINS"):
        allowed_private_origins("mirror.test:8080/path")


def test_origin():
    assert origin("HTTPS://Hub.Example/x?y") == "https://hub.example:443"
    assert origin("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert origin("http://[::1]/") == "http://::1:80"


@pytest.mark.parametrize(
    "source",
    [
        "huggingface.co/own%20er/repo",
        "https://huggingface.co/a%2F..%2F..%2Fapi/whoami-v2",
        "huggingface.co/a/b/resolve/..%2F..%2Fapi/x.safetensors",
        "huggingface.co/a/b/resolve/main/..%2F..%2Fx.safetensors",
        "huggingface.co/a--b/c",
    ],
)
def test_hugging_face_names_are_validated_as_the_hub_does(source):
    """Before: an internal error with a traceback, or a GET of an arbitrary hub path with a token."""
    from loras.sources import parse_source

    with pytest.raises(UserError, match="Hugging Face LoRA .*(not a valid repo id|is not valid)"):
        parse_source(source)
    parse_source("huggingface.co/some-owner/some.repo_1/resolve/v1.0/sub/x.safetensors")


def test_an_extra_lora_list_has_a_bounded_number_of_entries():
    """16,384 characters held about 600 URLs, each downloaded (up to 900 s) and parsed."""
    from loras.sources import MAX_EXTRA_LORAS, split_sources

    assert len(split_sources(", ".join(f"o/m{i}" for i in range(MAX_EXTRA_LORAS)))) == MAX_EXTRA_LORAS
    with pytest.raises(UserError, match=f"lists {MAX_EXTRA_LORAS + 1} LoRAs, over the {MAX_EXTRA_LORAS} accepted"):
        split_sources(", ".join(f"o/m{i}" for i in range(MAX_EXTRA_LORAS + 1)))


def test_a_requests_lora_downloads_share_one_deadline(tmp_path, monkeypatch):
    """Each entry used to get the whole LORA_DOWNLOAD_TOTAL_TIMEOUT (900 s) of its own: the manager now
    passes one deadline for all of them, and an entry fetched after it has passed fails at once."""
    import time

    from loras.cache import LoraCache

    monkeypatch.setenv("LORA_DOWNLOAD_TOTAL_TIMEOUT", "5")
    cache = LoraCache(tmp_path / "cache", 1 << 30)
    with pytest.raises(UserError, match="the request's LoRA downloads took longer than 5 s in all"):
        cache.fetch("https://example.com/second.safetensors", deadline=time.monotonic() - 0.1)
