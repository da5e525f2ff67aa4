"""Where LoRAs come from: every accepted source, the download cache, every failure, SSRF and tokens.

All HTTP goes to a local server on 127.0.0.1 imitating Replicate, Hugging Face and CivitAI.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch
from lora_fixtures import HTML_ERROR, RouteServer, tar_bytes
from safetensors.torch import load_file, save

import lora_sources
from errors import UserError
from lora_sources import LoraCache, parse_source

SECRETS = {"HF_TOKEN": "hf_SECRET_hf", "REPLICATE_API_TOKEN": "r8_SECRET_r8", "CIVITAI_API_TOKEN": "civ_SECRET_civ"}


def lora_bytes(seed: int = 0, size: int = 4) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save(
        {
            "transformer.x.lora_A.weight": torch.randn(4, size, generator=g),
            "transformer.x.lora_B.weight": torch.randn(size, 4, generator=g),
        }
    )


@pytest.fixture
def hub():
    server = RouteServer()
    yield server
    server.close()


@pytest.fixture
def env(hub, monkeypatch):
    for name in ("HF_TOKEN", "REPLICATE_API_TOKEN", "CIVITAI_API_TOKEN", "LORA_MAX_FILE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("REPLICATE_ENDPOINT", hub.url)
    monkeypatch.setenv("CIVITAI_ENDPOINT", hub.url)
    monkeypatch.setenv("LORA_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    return monkeypatch


@pytest.fixture
def cache(tmp_path):
    return LoraCache(tmp_path / "cache", 1 << 30)


def same_bytes(path: Path, data: bytes) -> bool:
    return path.read_bytes() == data


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, key",
    [
        ("owner/model", "replicate:owner/model"),
        ("https://replicate.com/owner/model", "replicate:owner/model"),
        ("replicate.com/Owner/Model/", "replicate:owner/model"),
        ("owner/model/abc123", "replicate:owner/model/versions/abc123"),
        ("owner/model/versions/abc123", "replicate:owner/model/versions/abc123"),
        ("https://replicate.com/owner/model/versions/abc123", "replicate:owner/model/versions/abc123"),
        ("huggingface.co/o/r", "hf:o/r@main:"),
        ("https://huggingface.co/o/r/", "hf:o/r@main:"),
        ("https://huggingface.co/o/r/resolve/main/x.safetensors", "hf:o/r@main:x.safetensors"),
        ("https://huggingface.co/o/r/blob/main/x.safetensors", "hf:o/r@main:x.safetensors"),
        ("https://huggingface.co/o/r/resolve/v2/sub/x.safetensors?download=true", "hf:o/r@v2:sub/x.safetensors"),
        ("https://huggingface.co/o/r/tree/main/sub", "hf:o/r@main:sub/"),
        ("huggingface.co/o/r/x.safetensors", "hf:o/r@main:x.safetensors"),
        ("https://civitai.com/models/123", "civitai:model:123"),
        ("https://civitai.com/models/123/some-slug", "civitai:model:123"),
        ("https://civitai.com/models/123/slug?modelVersionId=456", "civitai:version:456"),
        ("civitai.com/api/download/models/456", "civitai:version:456"),
        ("https://civitai.com/api/download/models/456?type=Model&format=SafeTensor", "civitai:version:456"),
        ("https://civitai.com/api/download/models/456?token=abc", "civitai:version:456"),
        ("https://example.com/a/b.safetensors?sig=1", "url:https://example.com/a/b.safetensors?sig=1"),
        ("https://replicate.delivery/x/y/trained_model.tar", "url:https://replicate.delivery/x/y/trained_model.tar"),
    ],
)
def test_parse_source_normalises(text, key):
    assert parse_source(text).key == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "just-a-name",
        "ftp://x/y.safetensors",
        "https://example.com/page.html",
        "https://civitai.com/user/foo",
        "a/b/c/d/e",
        "huggingface.co/datasets/x/y",
    ],
)
def test_unsupported_sources_list_the_accepted_forms(text):
    with pytest.raises(UserError) as e:
        parse_source(text)
    assert "\n" not in str(e.value)
    if text.startswith(("huggingface.co",)):
        assert "model repo" in str(e.value)
    else:
        assert "owner/model" in str(e.value) and "civitai.com/models/<id>" in str(e.value)


def test_local_paths(tmp_path, cache):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_bytes())
    assert cache.fetch(str(path)) == path
    assert cache.fetch(f"file://{path}") == path
    with pytest.raises(UserError, match="does not exist"):
        cache.fetch(str(tmp_path / "missing.safetensors"))
    (tmp_path / "page.safetensors").write_bytes(HTML_ERROR)
    with pytest.raises(UserError, match="HTML page"):
        cache.fetch(str(tmp_path / "page.safetensors"))


# ---------------------------------------------------------------- Replicate


def test_replicate_model_and_url_forms_share_one_entry(env, hub, cache):
    data = lora_bytes(1)
    hub.replicate_model("owner/model", data)
    path = cache.fetch("owner/model")
    assert same_bytes(path, data)
    assert cache.fetch("https://replicate.com/owner/model") == path
    assert cache.fetch("replicate.com/owner/model/") == path
    assert hub.hits("/owner/model/_weights") == 1 and cache.downloads == 1


def test_replicate_versions_and_direct_tar(env, hub, cache):
    data = lora_bytes(2)
    blob = hub.replicate_model("owner/model", data, version="abc123", inner="deep/er")
    assert same_bytes(cache.fetch("owner/model/abc123"), data)
    assert cache.fetch("owner/model/versions/abc123") == cache.fetch(
        "https://replicate.com/owner/model/versions/abc123"
    )
    assert hub.hits("/owner/model/versions/abc123/_weights") == 1
    assert same_bytes(cache.fetch(f"{hub.url}{blob}"), data)


def test_replicate_token_sent_to_replicate_only(env, hub, cache):
    env.setenv("REPLICATE_API_TOKEN", SECRETS["REPLICATE_API_TOKEN"])
    data = lora_bytes(3)
    tar = "/files/trained_model.tar"
    hub.add(tar, tar_bytes({"lora.safetensors": data}))
    # the weights host is another origin (localhost vs 127.0.0.1): credentials must not follow the redirect
    hub.redirect(
        "/owner/private/_weights",
        f"http://localhost:{hub.port}{tar}",
        require_auth=f"Bearer {SECRETS['REPLICATE_API_TOKEN']}",
    )
    assert same_bytes(cache.fetch("owner/private"), data)
    assert hub.headers_for("/owner/private/_weights")[0]["authorization"].endswith(SECRETS["REPLICATE_API_TOKEN"])
    assert "authorization" not in hub.headers_for(tar)[0]


def test_replicate_tar_with_several_files_is_a_clear_error(env, hub, cache):
    hub.add("/o/m/_weights", tar_bytes({"a.safetensors": lora_bytes(), "b.safetensors": lora_bytes(1)}))
    with pytest.raises(UserError, match="several .safetensors files.*a.safetensors, b.safetensors"):
        cache.fetch("o/m")
    hub.add("/o/n/_weights", tar_bytes({"weights.ckpt": b"\x80\x04junk"}))
    with pytest.raises(UserError, match="no .safetensors file"):
        cache.fetch("o/n")


# ---------------------------------------------------------------- Hugging Face


def test_hf_repo_picks_the_lora_file(env, hub, cache):
    data = lora_bytes(4)
    hub.hf_repo("o/several", {"README.md": b"# hi", "other.safetensors": lora_bytes(5), "lora.safetensors": data})
    assert same_bytes(cache.fetch("huggingface.co/o/several"), data)
    hub.hf_repo("o/pytorch", {"a.safetensors": lora_bytes(5), "pytorch_lora_weights.safetensors": data})
    assert same_bytes(cache.fetch("https://huggingface.co/o/pytorch"), data)
    hub.hf_repo("o/single", {"README.md": b"x", "my_style.safetensors": data})
    assert same_bytes(cache.fetch("https://huggingface.co/o/single"), data)
    hub.hf_repo("o/ambiguous", {"a.safetensors": data, "b.safetensors": data})
    with pytest.raises(UserError, match="several .safetensors files.*a.safetensors, b.safetensors"):
        cache.fetch("https://huggingface.co/o/ambiguous")


def test_hf_resolve_blob_and_subfolders(env, hub, cache):
    data = lora_bytes(6)
    hub.hf_repo("o/r", {"sub/x.safetensors": data, "other/y.safetensors": lora_bytes(7)}, revision="v2")
    first = cache.fetch("https://huggingface.co/o/r/resolve/v2/sub/x.safetensors?download=true")
    assert same_bytes(first, data)
    assert cache.fetch("https://huggingface.co/o/r/blob/v2/sub/x.safetensors") == first  # the file, not HTML
    assert same_bytes(cache.fetch("https://huggingface.co/o/r/tree/v2/sub"), data)
    assert hub.hits("/cdn/o/r/v2/sub/x.safetensors") == 2  # the file entry and the folder entry


def test_hf_token_on_every_hf_request(env, hub, cache):
    env.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    data = lora_bytes(8)
    hub.hf_repo("o/private", {"lora.safetensors": data}, token=SECRETS["HF_TOKEN"])
    assert same_bytes(cache.fetch("huggingface.co/o/private"), data)
    for path in ("/api/models/o/private/tree/main", "/o/private/resolve/main/lora.safetensors"):
        assert hub.headers_for(path)[0]["authorization"] == f"Bearer {SECRETS['HF_TOKEN']}"


def test_hf_errors(env, hub, cache):
    hub.hf_repo("o/private", {"lora.safetensors": lora_bytes()}, token="hf_other")
    with pytest.raises(UserError, match="401.*access denied"):
        cache.fetch("huggingface.co/o/private")
    with pytest.raises(UserError, match="404"):
        cache.fetch("huggingface.co/o/missing")
    hub.add("/o/gated/resolve/main/lora.safetensors", status=403, headers={"X-Error-Code": "GatedRepo"})
    with pytest.raises(UserError, match="gated.*HF_TOKEN"):
        cache.fetch("https://huggingface.co/o/gated/resolve/main/lora.safetensors")


# ---------------------------------------------------------------- CivitAI


def test_civitai_model_id_resolves_to_its_newest_version(env, hub, cache):
    newest, older = lora_bytes(9), lora_bytes(10)
    hub.civitai_model(123, [(457, newest), (456, older)])
    # the anchor bug: /api/download/models/<MODEL id> is a different thing (here: another file)
    hub.add("/api/download/models/123", lora_bytes(11))
    assert same_bytes(cache.fetch("https://civitai.com/models/123/some-slug"), newest)
    assert hub.hits("/api/download/models/123") == 0
    assert same_bytes(cache.fetch("https://civitai.com/models/123?modelVersionId=456"), older)
    assert cache.fetch("civitai.com/api/download/models/456") == cache.fetch(
        "https://civitai.com/models/1?modelVersionId=456"
    )
    assert hub.hits("/r2/model-456.safetensors") == 1


def test_civitai_token_is_a_header_never_a_url(env, hub, cache, caplog):
    env.setenv("CIVITAI_API_TOKEN", SECRETS["CIVITAI_API_TOKEN"])
    hub.civitai_model(5, [(50, lora_bytes(12))], token=SECRETS["CIVITAI_API_TOKEN"])
    with caplog.at_level(logging.DEBUG):
        cache.fetch("https://civitai.com/models/5")
    assert hub.headers_for("/api/v1/models/5")[0]["authorization"] == f"Bearer {SECRETS['CIVITAI_API_TOKEN']}"
    assert all(SECRETS["CIVITAI_API_TOKEN"] not in path for path, _ in hub.requests)
    assert SECRETS["CIVITAI_API_TOKEN"] not in caplog.text


def test_civitai_without_token_and_without_safetensors(env, hub, cache):
    hub.civitai_model(6, [(60, lora_bytes())], token="needed")
    with pytest.raises(UserError, match="401.*access denied"):
        cache.fetch("https://civitai.com/models/6")
    hub.add(
        "/api/v1/models/7",
        b'{"modelVersions": [{"id": 70, "files": [{"name": "x.pt", "type": "Model",'
        b' "metadata": {"format": "PickleTensor"}}]}]}',
    )
    with pytest.raises(UserError, match=r"no SafeTensor model file \(files: x.pt\)"):
        cache.fetch("https://civitai.com/models/7")


# ---------------------------------------------------------------- failures of the download itself


def test_each_failure_has_its_own_clear_error(env, hub, cache, tmp_path):
    hub.add("/html.safetensors", HTML_ERROR, headers={"Content-Type": "text/html"})
    hub.add("/zip.safetensors", b"PK\x03\x04" + b"\0" * 100)
    hub.add("/pickle.safetensors", b"\x80\x02}q\x00." + b"\0" * 20)
    hub.add("/forbidden.safetensors", status=403)
    hub.add("/slow.safetensors", lora_bytes(), delay=1.5)
    hub.add("/cut.safetensors", lora_bytes(size=512), truncate=300)
    hub.add("/big.safetensors", lora_bytes(size=512))
    url = hub.url
    cases = [
        ("html", "HTML page"),
        ("zip", "zip archive"),
        ("pickle", "pickle, which is never loaded"),
        ("forbidden", "HTTP 403, access denied"),
        ("missing", "HTTP 404, not found"),
        ("slow", "timed out after 0.5 s"),
        ("cut", "cut short|connection broke"),
    ]
    for name, message in cases:
        with pytest.raises(UserError, match=message):
            cache.fetch(f"{url}/{name}.safetensors")
    env.setenv("LORA_MAX_FILE_BYTES", "1000")
    with pytest.raises(UserError, match="over the 1,000-byte limit"):
        cache.fetch(f"{url}/big.safetensors")
    # nothing partial or corrupt was kept
    assert list(cache.cache_dir.glob("*.safetensors")) == []
    assert list(cache.tmp_dir.iterdir()) == []


def test_slow_trickle_hits_the_total_deadline(env, hub, cache):
    env.setenv("LORA_DOWNLOAD_TOTAL_TIMEOUT", "0.3")
    hub.add("/trickle.safetensors", lora_bytes(size=256), trickle=0.05)
    with pytest.raises(UserError, match="longer than 0.3 s"):
        cache.fetch(f"{hub.url}/trickle.safetensors")


def test_signed_url_query_is_kept_but_never_logged(env, hub, cache, caplog):
    data = lora_bytes(13)
    hub.add("/signed/l.safetensors", data)
    with caplog.at_level(logging.DEBUG, logger="lora_sources"):
        path = cache.fetch(f"{hub.url}/signed/l.safetensors?X-Signature=topsecret")
    assert same_bytes(path, data)
    assert hub.requests[-1][0].endswith("?X-Signature=topsecret")
    assert "topsecret" not in caplog.text and "topsecret" not in path.name


# ---------------------------------------------------------------- the cache


def test_one_download_for_repeated_and_concurrent_use(env, hub, cache):
    data = lora_bytes(14, size=256)
    hub.add("/c.safetensors", data, trickle=0.02)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.fetch(f"{hub.url}/c.safetensors"))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    cache.fetch(f"{hub.url}/c.safetensors")
    assert hub.hits("/c.safetensors") == 1
    assert load_file(results[0])["transformer.x.lora_A.weight"].shape == (4, 256)


def test_lru_eviction_by_bytes(env, hub, tmp_path):
    files = {f"/{n}.safetensors": lora_bytes(i, size=64) for i, n in enumerate("abc")}
    for path, data in files.items():
        hub.add(path, data)
    size = len(files["/a.safetensors"])
    cache = LoraCache(tmp_path / "small", max_bytes=2 * size + 10)
    a = cache.fetch(f"{hub.url}/a.safetensors")
    b = cache.fetch(f"{hub.url}/b.safetensors")
    import os
    import time

    os.utime(a, (time.time() - 100, time.time() - 100))
    os.utime(b, (time.time() - 50, time.time() - 50))
    cache.fetch(f"{hub.url}/a.safetensors")  # a is used again: b is now least recently used
    c = cache.fetch(f"{hub.url}/c.safetensors")
    assert a.exists() and c.exists() and not b.exists()
    cache.fetch(f"{hub.url}/a.safetensors")
    assert hub.hits("/a.safetensors") == 1  # never downloaded again while cached
    cache.fetch(f"{hub.url}/b.safetensors")
    assert hub.hits("/b.safetensors") == 2


def test_from_env(env, tmp_path):
    env.setenv("LORA_CACHE_DIR", str(tmp_path / "envcache"))
    env.setenv("LORA_CACHE_MAX_BYTES", "12345")
    cache = LoraCache.from_env()
    assert cache.cache_dir == tmp_path / "envcache" and cache.max_bytes == 12345


# ---------------------------------------------------------------- SSRF and tokens


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "[::1]",
        "[fd00:ec2::254]",
        "0.0.0.0",
        "100.64.0.1",
    ],
)
def test_private_addresses_are_refused_before_any_request(env, hub, cache, host):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    with pytest.raises(UserError, match="Refusing to fetch.*LORA_ALLOW_PRIVATE_URLS"):
        cache.fetch(f"http://{host}:{hub.port}/x.safetensors")
    assert hub.requests == []


def test_private_endpoints_are_refused_too(env, hub, cache):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    hub.replicate_model("owner/model", lora_bytes())
    for source in ("owner/model", "huggingface.co/o/r", "https://civitai.com/models/1"):
        with pytest.raises(UserError, match="Refusing to fetch"):
            cache.fetch(source)
    assert hub.requests == []


def test_every_redirect_hop_is_checked(env, hub, cache, monkeypatch):
    """A public-looking first hop that redirects to a private address is refused at that hop."""
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    real = lora_sources.resolve_host

    def fake_resolve(host, port):  # the guard sees the literal 127.0.0.1 as a public address
        return ["93.184.216.34"] if host == "127.0.0.1" else real(host, port)

    monkeypatch.setattr(lora_sources, "resolve_host", fake_resolve)
    hub.add("/target.safetensors", lora_bytes())
    hub.redirect("/hop.safetensors", f"http://localhost:{hub.port}/target.safetensors")
    with pytest.raises(UserError, match="Refusing to fetch.*localhost"):
        cache.fetch(f"{hub.url}/hop.safetensors")
    assert hub.hits("/hop.safetensors") == 1 and hub.hits("/target.safetensors") == 0


def test_tokens_never_in_logs_errors_or_file_names(env, hub, cache, caplog):
    for name, value in SECRETS.items():
        env.setenv(name, value)
    hub.hf_repo("o/r", {"lora.safetensors": lora_bytes(15)}, token=SECRETS["HF_TOKEN"])
    hub.replicate_model("o/m", lora_bytes(16))
    hub.civitai_model(8, [(80, lora_bytes(17))], token=SECRETS["CIVITAI_API_TOKEN"])
    errors = []
    with caplog.at_level(logging.DEBUG):
        for source in ("huggingface.co/o/r", "o/m", "https://civitai.com/models/8"):
            cache.fetch(source)
        for source in (
            "huggingface.co/o/nope",
            "o/nope",
            "https://civitai.com/models/9",
            f"{hub.url}/x.safetensors?token={SECRETS['CIVITAI_API_TOKEN']}",
        ):
            with pytest.raises(UserError) as e:
                cache.fetch(source)
            errors.append(str(e.value))
    names = " ".join(p.name for p in cache.cache_dir.rglob("*"))
    for value in SECRETS.values():
        assert value not in caplog.text
        assert value not in " ".join(errors)
        assert value not in names
