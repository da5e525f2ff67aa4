"""Where LoRAs come from, through `LoraCache.fetch`: every accepted source, local paths, the sites and
their tokens, the SSRF guard on the connections actually made, deadlines, and the disk cache.

All HTTP goes to local servers on 127.0.0.1 imitating Replicate, Hugging Face and CivitAI; host
names are mapped to addresses by a resolver the test injects (the SSRF guard's DNS lookup).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import threading
import time
from pathlib import Path

import pytest
import torch
from lora_fixtures import HTML_ERROR, RouteServer, tar_bytes
from safetensors.torch import load_file, save

from errors import UserError
from loras.cache import LoraCache, UserTokens
from loras.sources import parse_source, split_sources

SECRETS = {
    "HF_TOKEN": "hf_SECRET_hf",
    "LORA_HF_TOKEN": "hf_SECRET_lora",
    "REPLICATE_API_TOKEN": "r8_SECRET_r8",
    "CIVITAI_API_TOKEN": "civ_SECRET_civ",
}
USER_HF, USER_CIVITAI = "hf_USER_secret", "civ_USER_secret"
ENV = (
    "HF_TOKEN",
    "LORA_HF_TOKEN",
    "REPLICATE_API_TOKEN",
    "CIVITAI_API_TOKEN",
    "LORA_MAX_FILE_BYTES",
    "LORA_LOCAL_DIR",
    "LORA_DOWNLOAD_TOTAL_TIMEOUT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


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
def env(hub, monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("REPLICATE_ENDPOINT", hub.url)
    monkeypatch.setenv("CIVITAI_ENDPOINT", hub.url)
    monkeypatch.setenv("LORA_ALLOW_PRIVATE_URLS", "1")
    # a silent read is given up after 2 s: long enough for a test hub on a loaded 2-core machine
    # (0.5 s timed out a healthy answer there), short enough for the hang tests
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return monkeypatch


@pytest.fixture
def cache(tmp_path):
    return LoraCache(tmp_path / "cache", 1 << 30)


def same_bytes(path: Path, data: bytes) -> bool:
    return path.read_bytes() == data


def auth_headers(hub) -> list[str]:
    return [h.get("authorization", "") for _, h in hub.requests]


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
        ("https://civitai.com/models/9?token=abc", "civitai:model:9"),
        ("https://example.com/a/b.safetensors?sig=1", "url:https://example.com/a/b.safetensors?sig=1"),
        ("https://replicate.delivery/x/y/trained_model.tar", "url:https://replicate.delivery/x/y/trained_model.tar"),
        ("/srv/loras/a.safetensors", "local:/srv/loras/a.safetensors"),
        ("/srv/loras/sub/../a.safetensors", "local:/srv/loras/a.safetensors"),
        ("file:///srv/loras/a.safetensors", "local:/srv/loras/a.safetensors"),
        ("mine.safetensors", f"local:{os.getcwd()}/mine.safetensors"),
        ("loras/mine.safetensors", f"local:{os.getcwd()}/loras/mine.safetensors"),
        ("~/x.safetensors", f"local:{os.path.expanduser('~')}/x.safetensors"),
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
        "file://otherhost/etc/passwd",
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


def test_a_pasted_token_is_kept_out_of_key_label_and_repr():
    source = parse_source("https://civitai.com/api/download/models/456?type=Model&format=SafeTensor&token=zzSECRETzz")
    assert source.token == "zzSECRETzz"
    assert "zzSECRETzz" not in source.key + source.label + repr(source) + source.url


def test_split_sources():
    assert split_sources(None, 0.7) == [] and split_sources("  ", 0.7) == []
    assert split_sources("o/m", 0.7) == [("o/m", 0.7)]
    assert split_sources("x/y:0.5, a/b\nhuggingface.co/o/r : -1", 0.7) == [
        ("x/y", 0.5),
        ("a/b", 0.7),
        ("huggingface.co/o/r", -1.0),
    ]
    url = "https://h.test:8080/a.safetensors?sig=1"
    assert split_sources(url, 1.0) == [(url, 1.0)]  # a port is not a scale
    assert split_sources(f"{url}:2,", 1.0) == [(url, 2.0)]
    with pytest.raises(UserError, match=r"'a/b:3': its scale must be from -1 to 2"):
        split_sources("x/y:0.5, a/b:3")
    with pytest.raises(UserError, match=r"'https://h.test/a.safetensors\?…:9'") as e:
        split_sources("https://h.test/a.safetensors?sig=SECRET:9")
    assert "SECRET" not in str(e.value)
    with pytest.raises(UserError, match="Unsupported LoRA source 'not a lora'"):
        split_sources("o/m, not a lora")


# ---------------------------------------------------------------- local paths


def local_refusal(cache, text: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        cache.fetch(text, **kw)
    message = str(e.value)
    assert "\n" not in message and repr(parse_source(text).label) in message
    return message.replace(repr(parse_source(text).label), "<path>")


def test_local_paths_are_refused_by_default_without_looking_at_them(env, tmp_path, cache, monkeypatch):
    real = tmp_path / "real.safetensors"
    real.write_bytes(lora_bytes())
    (tmp_path / "folder.safetensors").mkdir()
    sources = [
        "/etc/passwd",
        "/etc/shadow.safetensors",
        "~/.ssh/id_rsa",
        "../../etc/hosts",
        "./nothing/here.safetensors",
        "file:///etc/passwd",
        str(real),
        f"file://{real}",
        str(tmp_path / "missing.safetensors"),
        str(tmp_path / "folder.safetensors"),
        "/dev/zero",
    ]

    def looked(*args, **kw):
        raise AssertionError(f"a request's local path was looked at: {args}")

    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "open", "scandir", "listdir"):
            m.setattr(os, name, looked)
        m.setattr(os.path, "realpath", looked)
        m.setattr("builtins.open", looked)
        messages = {local_refusal(cache, s) for s in sources}
    assert len(messages) == 1, messages
    assert "local paths are not accepted" in messages.pop()


def test_lora_local_dir_serves_only_regular_files_inside_it(env, tmp_path, cache):
    root = tmp_path / "loras"
    (root / "sub").mkdir(parents=True)
    good = root / "sub" / "good.safetensors"
    good.write_bytes(lora_bytes(1))
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(lora_bytes(2))
    (root / "escape.safetensors").symlink_to(outside)
    (root / "inner-link.safetensors").symlink_to(good)
    (root / "dir.safetensors").mkdir()
    (root / "page.safetensors").write_bytes(HTML_ERROR)
    os.mkfifo(root / "fifo.safetensors")
    env.setenv("LORA_LOCAL_DIR", str(root))

    assert cache.fetch(str(good)) == good
    assert cache.fetch(f"file://{good}") == good
    assert cache.fetch(str(root / "inner-link.safetensors")) == good  # a link inside the folder: its target
    assert cache.fetch(str(root / "sub" / ".." / "sub" / "good.safetensors")) == good
    refused = {
        local_refusal(cache, text)
        for text in (
            str(outside),
            str(root / "escape.safetensors"),  # a symlink out of the folder
            str(root / "sub" / ".." / ".." / "outside.safetensors"),  # `..` out of the folder
            str(root / "missing.safetensors"),
            str(root / "dir.safetensors"),
            str(root / "fifo.safetensors"),
            str(root),
            "/etc/passwd",
        )
    }
    assert len(refused) == 1, refused
    assert "LORA_LOCAL_DIR" in refused.pop()
    with pytest.raises(UserError, match="HTML page"):
        cache.fetch(str(root / "page.safetensors"))
    env.setenv("LORA_MAX_FILE_BYTES", "100")
    with pytest.raises(UserError, match="over the 100-byte limit"):
        cache.fetch(str(good))


def test_operator_may_name_any_local_path(env, tmp_path, cache):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_bytes())
    assert cache.fetch(str(path), operator=True) == path
    assert cache.fetch(f"file://{path}", operator=True) == path
    with pytest.raises(UserError, match="does not exist"):
        cache.fetch(str(tmp_path / "missing.safetensors"), operator=True)
    (tmp_path / "page.safetensors").write_bytes(HTML_ERROR)
    with pytest.raises(UserError, match="HTML page"):
        cache.fetch(str(tmp_path / "page.safetensors"), operator=True)


# ---------------------------------------------------------------- Replicate


def test_replicate_model_and_url_forms_share_one_entry(env, hub, cache):
    data = lora_bytes(1)
    hub.replicate_model("owner/model", data)
    path = cache.fetch("owner/model")
    assert same_bytes(path, data)
    assert cache.fetch("https://replicate.com/owner/model") == path
    assert cache.fetch("replicate.com/owner/model/") == path
    assert hub.hits("/owner/model/_weights") == 1
    assert not hasattr(cache, "downloads")


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
    commit = hub.hf_repo("o/r", {"sub/x.safetensors": data, "other/y.safetensors": lora_bytes(7)}, revision="v2")
    first = cache.fetch("https://huggingface.co/o/r/resolve/v2/sub/x.safetensors?download=true")
    assert same_bytes(first, data)
    assert cache.fetch("https://huggingface.co/o/r/blob/v2/sub/x.safetensors") == first  # the file, not HTML
    assert same_bytes(cache.fetch("https://huggingface.co/o/r/tree/v2/sub"), data)
    # the tag is fetched at the commit it names (a moving source), the file entry and the folder entry
    assert hub.hits(f"/cdn/o/r/{commit}/sub/x.safetensors") == 2


def test_hf_tree_pagination_follows_link_headers(env, hub, cache):
    data = lora_bytes(8)
    commit = hub.hf_repo("o/paged", {"README.md": b"x", "lora.safetensors": data})
    first = hub.routes[f"/api/models/o/paged/tree/{commit}"]
    hub.add(
        f"/api/models/o/paged/tree/{commit}",
        b'[{"type": "file", "path": "README.md"}]',
        headers={"Link": f'<{hub.url}/api/models/o/paged/page2?cursor=x>; rel="next"'},
    )
    hub.add("/api/models/o/paged/page2", first.body.replace(b'"README.md"', b'"other.md"'))
    assert same_bytes(cache.fetch("huggingface.co/o/paged"), data)
    assert hub.hits("/api/models/o/paged/page2") == 1


def test_hf_loras_never_get_hf_token_nor_the_saved_login(env, hub, cache, tmp_path):
    env.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    saved = tmp_path / "hf-home" / "token"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text("hf_SAVED_login")
    hub.hf_repo("o/public", {"lora.safetensors": lora_bytes(8)})
    hub.hf_repo("o/gated-by-hf-token", {"lora.safetensors": lora_bytes(9)}, token=SECRETS["HF_TOKEN"])
    cache.fetch("huggingface.co/o/public")
    with pytest.raises(UserError, match="401"):
        cache.fetch("huggingface.co/o/gated-by-hf-token")
    assert auth_headers(hub) == [""] * len(hub.requests)


def test_lora_hf_token_goes_to_the_hf_endpoint_only(env, hub, cache):
    token = SECRETS["LORA_HF_TOKEN"]
    env.setenv("LORA_HF_TOKEN", token)
    data = lora_bytes(10)
    commit = hub.hf_repo("o/private", {"lora.safetensors": data}, token=token)
    cdn = "/elsewhere/lora.safetensors"
    hub.add(cdn, data)  # the file itself lives on another origin (localhost vs 127.0.0.1)
    resolve = f"/o/private/resolve/{commit}/lora.safetensors"
    hub.redirect(resolve, f"http://localhost:{hub.port}{cdn}", require_auth=f"Bearer {token}")
    path = cache.fetch("huggingface.co/o/private")
    assert same_bytes(path, data)
    for route in ("/api/models/o/private/revision/main", f"/api/models/o/private/tree/{commit}", resolve):
        assert hub.headers_for(route)[0]["authorization"] == f"Bearer {token}"
    assert "authorization" not in hub.headers_for(cdn)[0]
    assert cache.fetch("huggingface.co/o/private") == path  # the deployment's token is lent to every request


def test_operator_falls_back_to_hf_token_and_its_entries_are_not_lent(env, hub, cache):
    env.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    data = lora_bytes(11)
    commit = hub.hf_repo("o/main", {"lora.safetensors": data}, token=SECRETS["HF_TOKEN"])
    path = cache.fetch("huggingface.co/o/main", operator=True)
    assert same_bytes(path, data)
    assert hub.headers_for(f"/o/main/resolve/{commit}/lora.safetensors")[0]["authorization"].endswith(
        SECRETS["HF_TOKEN"]
    )
    with pytest.raises(UserError, match="401"):  # a request does not get what HF_TOKEN fetched
        cache.fetch("huggingface.co/o/main")
    assert cache.fetch("huggingface.co/o/main", operator=True) == path


def test_a_users_hf_token_wins_and_its_loras_stay_its_own(env, hub, cache, caplog):
    env.setenv("LORA_HF_TOKEN", SECRETS["LORA_HF_TOKEN"])
    data = lora_bytes(12)
    commit = hub.hf_repo("o/mine", {"lora.safetensors": data}, token=USER_HF)
    mine = UserTokens(huggingface=USER_HF)
    with caplog.at_level(logging.DEBUG):
        path = cache.fetch("huggingface.co/o/mine", mine)
    assert same_bytes(path, data)
    sent = {h.get("authorization") for p, h in hub.requests if not p.startswith("/cdn/")}
    assert sent == {f"Bearer {USER_HF}"}
    hits = hub.hits(f"/cdn/o/mine/{commit}/lora.safetensors")
    assert hits == 1
    assert cache.fetch("huggingface.co/o/mine", UserTokens(huggingface=USER_HF)) == path
    assert hub.hits(f"/cdn/o/mine/{commit}/lora.safetensors") == hits
    errors = []
    for tokens in (None, UserTokens(), UserTokens(huggingface="hf_someone_else"), UserTokens(civitai=USER_HF)):
        with pytest.raises(UserError, match="401") as e:
            cache.fetch("huggingface.co/o/mine", tokens)
        errors.append(str(e.value))
    names = " ".join(p.name for p in cache.cache_dir.rglob("*"))
    for text in (caplog.text, " ".join(errors), names, repr(mine), str(mine)):
        assert USER_HF not in text


def test_a_token_holder_may_use_what_anyone_may_have(env, hub, cache):
    data = lora_bytes(13)
    commit = hub.hf_repo("o/public", {"lora.safetensors": data})
    path = cache.fetch("huggingface.co/o/public")
    assert cache.fetch("huggingface.co/o/public", UserTokens(huggingface=USER_HF)) == path
    assert hub.hits(f"/cdn/o/public/{commit}/lora.safetensors") == 1


def test_a_malformed_user_token_is_refused_before_any_request(env, hub, cache):
    hub.hf_repo("o/r", {"lora.safetensors": lora_bytes()})
    bad = "hf_x\r\nX-Injected: yes"
    with pytest.raises(UserError, match="Hugging Face token is malformed") as e:
        cache.fetch("huggingface.co/o/r", UserTokens(huggingface=bad))
    assert bad not in str(e.value) and hub.requests == []


def test_user_tokens_repr_shows_no_token():
    tokens = UserTokens(huggingface=USER_HF, civitai=USER_CIVITAI)
    assert USER_HF not in repr(tokens) + str(tokens) + f"{tokens!r}"
    assert USER_CIVITAI not in repr(tokens)
    assert "huggingface=<set>" in repr(tokens) and "civitai=''" in repr(UserTokens(huggingface="x"))


def test_hf_errors(env, hub, cache):
    hub.hf_repo("o/private", {"lora.safetensors": lora_bytes()}, token="hf_other")
    with pytest.raises(UserError, match="401.*access denied"):
        cache.fetch("huggingface.co/o/private")
    with pytest.raises(UserError, match="404"):
        cache.fetch("huggingface.co/o/missing")
    commit = "0" * 40  # a gated repo's metadata is public, its files are not
    hub.add("/api/models/o/gated/revision/main", json.dumps({"sha": commit}).encode())
    hub.add(f"/o/gated/resolve/{commit}/lora.safetensors", status=403, headers={"X-Error-Code": "GatedRepo"})
    with pytest.raises(UserError, match="gated.*token"):
        cache.fetch("https://huggingface.co/o/gated/resolve/main/lora.safetensors")


def test_a_moving_hugging_face_branch_is_served_at_its_new_commit_after_the_ttl(env, cache, tmp_path, caplog):
    """huggingface.co/owner/repo names a branch: the commit it names is asked at most every LORA_RESOLVE_TTL
    seconds and the file is cached by that commit, so a push is served within the TTL (on every replica),
    and the log says which commit a request used. The hub (tests/fake_hub.py) moves `main` when its files change."""
    from fake_hub import FakeHub

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "lora.safetensors").write_bytes(lora_bytes(20))
    with FakeHub({"someone/style": repo}) as moving:
        env.setenv("HF_ENDPOINT", moving.url)
        env.setenv("LORA_RESOLVE_TTL", "1")
        before = moving.commit("someone/style")
        with caplog.at_level(logging.INFO, logger="loras.cache"):
            first = cache.fetch("huggingface.co/someone/style")
        assert same_bytes(first, lora_bytes(20))
        assert f"LoRA huggingface.co/someone/style: main is commit {before}" in caplog.text
        (repo / "lora.safetensors").write_bytes(lora_bytes(21))  # a push: main moves
        after = moving.commit("someone/style")
        asked = len(moving.requests)
        assert cache.fetch("huggingface.co/someone/style") == first  # within the TTL: the commit known
        assert len(moving.requests) == asked  # nothing asked
        time.sleep(1.05)
        with caplog.at_level(logging.INFO, logger="loras.cache"):
            moved = cache.fetch("huggingface.co/someone/style")
        assert moved != first and same_bytes(moved, lora_bytes(21))
        assert f"main moved from {before[:12]} to {after[:12]}" in caplog.text
        time.sleep(1.05)  # after the TTL, no push: one question, no download
        downloads = len(moving.resolved())
        assert cache.fetch("huggingface.co/someone/style") == moved
        assert len(moving.resolved()) == downloads
    # the hub is gone: the last commit known is served, with a warning
    time.sleep(1.05)
    with caplog.at_level(logging.WARNING, logger="loras.cache"):
        assert cache.fetch("huggingface.co/someone/style") == moved
    assert "serving the last known one" in caplog.text


# ---------------------------------------------------------------- CivitAI


def test_a_civitai_models_newest_version_is_asked_again_after_the_ttl(env, hub, cache, caplog):
    """civitai.com/models/<id> names the newest version: it is cached by that version (the same entry as the
    version's own link) and asked again at most every LORA_RESOLVE_TTL seconds."""
    env.setenv("LORA_RESOLVE_TTL", "1")
    first, second = lora_bytes(30), lora_bytes(31)
    hub.civitai_model(5, [(50, first)])
    with caplog.at_level(logging.INFO, logger="loras.cache"):
        old = cache.fetch("https://civitai.com/models/5")
    assert same_bytes(old, first) and "civitai model 5: the newest version is version 50" in caplog.text
    assert cache.fetch("https://civitai.com/api/download/models/50") == old  # one entry for one version
    hub.civitai_model(5, [(51, second), (50, first)])  # a new version is published
    assert cache.fetch("https://civitai.com/models/5") == old  # within the TTL
    time.sleep(1.05)
    with caplog.at_level(logging.INFO, logger="loras.cache"):
        new = cache.fetch("https://civitai.com/models/5")
    assert same_bytes(new, second) and "the newest version moved from 50 to 51" in caplog.text


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


@pytest.mark.parametrize("how", ["tokens", "pasted"])
def test_a_users_civitai_token_wins_goes_in_a_header_and_stays_its_own(env, hub, cache, how):
    env.setenv("CIVITAI_API_TOKEN", SECRETS["CIVITAI_API_TOKEN"])
    data = lora_bytes(14)
    hub.civitai_model(7, [(70, data)], token=USER_CIVITAI)
    if how == "tokens":
        path = cache.fetch("https://civitai.com/models/7", UserTokens(civitai=USER_CIVITAI))
    else:
        path = cache.fetch(f"https://civitai.com/models/7?token={USER_CIVITAI}")
    assert same_bytes(path, data)
    assert hub.headers_for("/api/v1/models/7")[0]["authorization"] == f"Bearer {USER_CIVITAI}"
    assert all(USER_CIVITAI not in p for p, _ in hub.requests) and USER_CIVITAI not in path.name
    with pytest.raises(UserError, match="401"):
        cache.fetch("https://civitai.com/models/7")


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


def test_each_failure_has_its_own_clear_error(env, hub, cache):
    hub.add("/html.safetensors", HTML_ERROR, headers={"Content-Type": "text/html"})
    hub.add("/zip.safetensors", b"PK\x03\x04" + b"\0" * 100)
    hub.add("/pickle.safetensors", b"\x80\x02}q\x00." + b"\0" * 20)
    hub.add("/forbidden.safetensors", status=403)
    hub.add("/slow.safetensors", lora_bytes(), delay=4)  # past the 2 s read timeout
    hub.add("/cut.safetensors", lora_bytes(size=512), truncate=300)
    hub.add("/big.safetensors", lora_bytes(size=512))
    hub.add("/damaged.tar", tar_bytes({"lora.safetensors": lora_bytes(size=512)})[:1000])
    hub.redirect("/loop.safetensors", "/loop.safetensors")
    cases = [
        ("html.safetensors", "HTML page"),
        ("zip.safetensors", "zip archive"),
        ("pickle.safetensors", "pickle, which is never loaded"),
        ("forbidden.safetensors", "HTTP 403, access denied"),
        ("missing.safetensors", "HTTP 404, not found"),
        ("slow.safetensors", "timed out after 2 s"),
        ("cut.safetensors", "cut short|connection broke"),
        ("damaged.tar", "damaged or truncated|not a safetensors"),
        ("loop.safetensors", "too many redirects"),
    ]
    for name, message in cases:
        with pytest.raises(UserError, match=message) as e:
            cache.fetch(f"{hub.url}/{name}")
        assert "\n" not in str(e.value)
        assert e.value.__cause__ is None and (e.value.__suppress_context__ or e.value.__context__ is None)
    env.setenv("LORA_MAX_FILE_BYTES", "1000")
    with pytest.raises(UserError, match="over the 1,000-byte limit"):
        cache.fetch(f"{hub.url}/big.safetensors")
    # nothing partial or corrupt was kept
    assert list(cache.cache_dir.glob("*.safetensors")) == []
    assert list(cache.tmp_dir.iterdir()) == []


def test_signed_url_query_is_kept_but_never_logged(env, hub, cache, caplog):
    data = lora_bytes(13)
    hub.add("/signed/l.safetensors", data)
    with caplog.at_level(logging.DEBUG):
        path = cache.fetch(f"{hub.url}/signed/l.safetensors?X-Signature=topsecret")
    assert same_bytes(path, data)
    assert hub.requests[-1][0].endswith("?X-Signature=topsecret")
    assert "topsecret" not in caplog.text and "topsecret" not in path.name


# ---------------------------------------------------------------- deadlines


TRICKLE = {"trickle": 0.1, "piece": 1}  # one byte every 0.1 s: each read waits well under the read timeout


def assert_deadline(cache, source: str, started: float, deadline: float = 0.6):
    with pytest.raises(UserError, match=f"took longer than {deadline:g} s"):
        cache.fetch(source)
    assert time.monotonic() - started < deadline + 1.5


def test_the_total_deadline_holds_against_a_byte_trickle(env, hub, cache):
    env.setenv("LORA_DOWNLOAD_TOTAL_TIMEOUT", "0.6")
    hub.add("/trickle.safetensors", lora_bytes(size=8), **TRICKLE)
    assert_deadline(cache, f"{hub.url}/trickle.safetensors", time.monotonic())
    hub.add("/slow-head.safetensors", lora_bytes(size=8), head_trickle=0.1)  # the status line and headers
    assert_deadline(cache, f"{hub.url}/slow-head.safetensors", time.monotonic())
    assert list(cache.tmp_dir.iterdir()) == []


def test_the_total_deadline_holds_for_the_api_calls(env, hub, cache):
    env.setenv("LORA_DOWNLOAD_TOTAL_TIMEOUT", "0.6")
    commit = hub.hf_repo("o/slow", {"lora.safetensors": lora_bytes()})
    hub.add(f"/api/models/o/slow/tree/{commit}", hub.routes[f"/api/models/o/slow/tree/{commit}"].body, **TRICKLE)
    assert_deadline(cache, "huggingface.co/o/slow", time.monotonic())
    hub.civitai_model(3, [(30, lora_bytes())])
    hub.add("/api/v1/models/3", hub.routes["/api/v1/models/3"].body, **TRICKLE)
    assert_deadline(cache, "https://civitai.com/models/3", time.monotonic())


def test_the_deadline_covers_the_whole_fetch(env, hub, cache):
    """API call and file share one deadline: each alone is under it, together they are over."""
    env.setenv("LORA_DOWNLOAD_TOTAL_TIMEOUT", "0.6")
    hub.civitai_model(4, [(40, lora_bytes())])
    hub.routes["/api/v1/models/4"].delay = 0.4
    hub.routes["/r2/model-40.safetensors"].delay = 0.4
    assert_deadline(cache, "https://civitai.com/models/4", time.monotonic())


# ---------------------------------------------------------------- the SSRF guard, end to end


def resolver_to(mapping: dict[str, list[str]], calls: list | None = None):
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return mapping.get(host, ["127.0.0.1"])

    return resolve


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
        "[::ffff:127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo, client 127.0.0.1
    ],
)
def test_private_addresses_are_refused_before_any_request(env, hub, cache, host):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    with pytest.raises(UserError, match="Refusing to fetch.*not a public Internet address"):
        cache.fetch(f"http://{host}:{hub.port}/x.safetensors")
    assert hub.requests == []


@pytest.mark.parametrize(
    "answer", ["64:ff9b::7f00:1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:80ff:fffe", "::ffff:10.0.0.1"]
)
def test_tunnelled_answers_are_refused(env, hub, tmp_path, answer):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    cache = LoraCache(tmp_path / "c", 1 << 30, resolver=resolver_to({"tunnel.test": [answer]}))
    with pytest.raises(UserError, match="Refusing to fetch"):
        cache.fetch(f"http://tunnel.test:{hub.port}/x.safetensors")
    assert hub.requests == []


def test_dns_rebinding_cannot_redirect_the_connection(env, hub, tmp_path):
    """The resolver answers a public address for the check, then 127.0.0.1 (the rebinding attack):
    the connection goes to the address that was checked (refused offline), never to the hub."""
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    calls = []
    answers = iter([["93.184.216.34"]])

    def rebinding(host, port):
        calls.append(host)
        return next(answers, ["127.0.0.1"])

    hub.add("/x.safetensors", lora_bytes())
    cache = LoraCache(tmp_path / "c", 1 << 30, resolver=rebinding)
    with pytest.raises(UserError, match="could not connect"):
        cache.fetch(f"http://localhost:{hub.port}/x.safetensors")
    assert hub.requests == [] and calls == ["localhost"]


def test_the_connection_goes_to_the_checked_address_with_the_hostname(env, hub, tmp_path):
    data = lora_bytes(20)
    hub.add("/x.safetensors", data)
    calls = []
    cache = LoraCache(tmp_path / "c", 1 << 30, resolver=resolver_to({"pinned.test": ["127.0.0.1"]}, calls))
    assert same_bytes(cache.fetch(f"http://pinned.test:{hub.port}/x.safetensors"), data)  # .test: no real DNS
    assert hub.headers_for("/x.safetensors")[0]["host"] == f"pinned.test:{hub.port}"
    assert calls == ["pinned.test"]


def test_every_redirect_hop_is_checked_and_resolved_once(env, hub, tmp_path):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    calls = []
    answers = {"public.test": ["93.184.216.34"], "inside.test": ["10.0.0.7"]}
    cache = LoraCache(tmp_path / "c", 1 << 30, resolver=resolver_to(answers, calls))
    hub.redirect("/owner/model/_weights", f"http://inside.test:{hub.port}/x.safetensors")
    with pytest.raises(UserError, match="Refusing to fetch.*inside.test"):
        cache.fetch("owner/model")  # the endpoint (configured, trusted) answers; its redirect is checked
    assert hub.hits("/owner/model/_weights") == 1 and hub.hits("/x.safetensors") == 0
    assert calls == ["inside.test"]  # 127.0.0.1, the endpoint, is a literal: nothing to resolve


def test_configured_endpoints_are_trusted_user_urls_are_not(env, hub, cache):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    hub.replicate_model("owner/model", lora_bytes(21))
    hub.hf_repo("o/r", {"lora.safetensors": lora_bytes(22)})
    hub.civitai_model(1, [(10, lora_bytes(23))])
    for source in ("owner/model", "huggingface.co/o/r", "https://civitai.com/models/1"):
        cache.fetch(source)
    seen = len(hub.requests)
    hub.add("/x.safetensors", lora_bytes())
    # typed by a user, a URL to the very same host is guarded
    for url in (f"{hub.url}/x.safetensors", f"{hub.url}/cdn/o/r/main/lora.safetensors"):
        with pytest.raises(UserError, match="Refusing to fetch"):
            cache.fetch(url)
    assert len(hub.requests) == seen


def test_default_endpoints_are_guarded_like_any_host(env, hub, tmp_path):
    env.delenv("LORA_ALLOW_PRIVATE_URLS")
    env.delenv("HF_ENDPOINT")
    cache = LoraCache(tmp_path / "c", 1 << 30, resolver=resolver_to({"huggingface.co": ["127.0.0.1"]}))
    with pytest.raises(UserError, match="Refusing to fetch.*huggingface.co"):
        cache.fetch("huggingface.co/o/r")
    assert hub.requests == []


def test_tokens_never_in_logs_errors_or_file_names(env, hub, cache, caplog):
    for name, value in SECRETS.items():
        env.setenv(name, value)
    hub.hf_repo("o/r", {"lora.safetensors": lora_bytes(15)}, token=SECRETS["LORA_HF_TOKEN"])
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


# ---------------------------------------------------------------- https


def tls_files(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (its own CA) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_https_checks_the_certificate_and_sni_against_the_hostname(env, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = tls_files(tmp_path, "lora.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server = RouteServer(tls=context)
    try:
        data = lora_bytes(30)
        server.add("/x.safetensors", data)
        env.setenv("REQUESTS_CA_BUNDLE", str(cert))
        cache = LoraCache(tmp_path / "c", 1 << 30, resolver=resolver_to({}))  # every name → 127.0.0.1
        assert same_bytes(cache.fetch(f"https://lora.test:{server.port}/x.safetensors"), data)
        assert names == ["lora.test"]
        assert server.headers_for("/x.safetensors")[0]["host"] == f"lora.test:{server.port}"
        with pytest.raises(UserError, match="TLS connection to other.test failed"):
            cache.fetch(f"https://other.test:{server.port}/x.safetensors")
        assert len(server.requests) == 1
    finally:
        server.close()


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


def age(path: Path, seconds: float) -> None:
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def three_files(hub) -> int:
    files = {f"/{n}.safetensors": lora_bytes(i, size=64) for i, n in enumerate("abc")}
    for path, data in files.items():
        hub.add(path, data)
    return len(files["/a.safetensors"])


def test_lru_eviction_by_bytes(env, hub, tmp_path):
    size = three_files(hub)
    cache = LoraCache(tmp_path / "small", max_bytes=2 * size + 10)
    a = cache.fetch(f"{hub.url}/a.safetensors")
    b = cache.fetch(f"{hub.url}/b.safetensors")
    age(a, 1000)
    age(b, 500)
    cache.fetch(f"{hub.url}/a.safetensors")  # a is used again: b is now least recently used
    c = cache.fetch(f"{hub.url}/c.safetensors")
    assert a.exists() and c.exists() and not b.exists()
    cache.fetch(f"{hub.url}/a.safetensors")
    assert hub.hits("/a.safetensors") == 1  # never downloaded again while cached
    age(a, 1000)
    age(c, 1000)
    cache.fetch(f"{hub.url}/b.safetensors")
    assert hub.hits("/b.safetensors") == 2


def test_eviction_spares_entries_in_use(env, hub, tmp_path):
    size = three_files(hub)
    cache = LoraCache(tmp_path / "small", max_bytes=size + 10)
    a = cache.fetch(f"{hub.url}/a.safetensors")
    b = cache.fetch(f"{hub.url}/b.safetensors")  # a was used a moment ago (it may be loading): kept
    assert a.exists() and b.exists()
    age(a, 1000)
    age(b, 1000)
    with cache.entry_lock(a):  # as if another process were between its fetch and its load of a
        c = cache.fetch(f"{hub.url}/c.safetensors")
        assert a.exists() and not b.exists() and c.exists()
    age(c, 1000)
    cache.fetch(f"{hub.url}/b.safetensors")
    assert not a.exists() and not c.exists()


def test_use_is_recorded_in_the_access_time_not_the_mtime(env, hub, cache):
    three_files(hub)
    a = cache.fetch(f"{hub.url}/a.safetensors")
    age(a, 1000)
    before = a.stat()
    assert cache.fetch(f"{hub.url}/a.safetensors") == a
    after = a.stat()
    assert after.st_mtime_ns == before.st_mtime_ns and after.st_atime > before.st_atime + 900


def test_lock_files_do_not_pile_up(env, hub, cache):
    three_files(hub)
    for name in "abc":
        cache.fetch(f"{hub.url}/{name}.safetensors")
    for name in ("missing", "other"):
        with pytest.raises(UserError):
            cache.fetch(f"{hub.url}/{name}.safetensors")
    assert list(cache.lock_dir.iterdir()) == []
    left = cache.lock_dir / ("0" * 40 + ".lock")  # what a process killed while holding a lock leaves
    left.touch()
    age(left, 7200)
    LoraCache(cache.cache_dir, cache.max_bytes).fetch(f"{hub.url}/a.safetensors")
    assert list(cache.lock_dir.iterdir()) == []


def test_from_env(env, tmp_path):
    env.setenv("LORA_CACHE_DIR", str(tmp_path / "envcache"))
    env.setenv("LORA_CACHE_MAX_BYTES", "12345")
    cache = LoraCache.from_env()
    assert cache.cache_dir == tmp_path / "envcache" and cache.max_bytes == 12345
