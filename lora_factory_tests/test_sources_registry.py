"""Site presets, the client registry, and the ImageSites resource that configures them."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_factory.resources.sites import ImageSites, SiteConfig, site_from_env
from lora_factory.sources.anime_pictures import AnimePicturesClient
from lora_factory.sources.base import MediaPolicy
from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.e621 import E621Client
from lora_factory.sources.gelbooru import GelbooruClient, GelbooruV02Client
from lora_factory.sources.local_folder import LocalFolderClient
from lora_factory.sources.moebooru import MoebooruClient
from lora_factory.sources.pixiv import PixivClient
from lora_factory.sources.registry import (
    PRESETS,
    HttpSettings,
    MissingCredentials,
    SiteSettings,
    build_client,
    build_clients,
    credential_env_vars,
)
from lora_factory.sources.sankaku import SankakuClient
from lora_factory.sources.wallhaven import WallhavenClient
from lora_factory.sources.zerochan import ZerochanClient

CREDENTIALS = {"login": "alice", "api_key": "k3y-secret", "user_id": "7", "password": "hunter2",
               "refresh_token": "refresh-secret"}
EXPECTED_CLASS = {
    "danbooru": DanbooruClient, "safebooru_donmai": DanbooruClient, "atfbooru": DanbooruClient,
    "gelbooru": GelbooruClient, "safebooru": GelbooruV02Client, "rule34": GelbooruV02Client,
    "tbib": GelbooruV02Client, "xbooru": GelbooruV02Client, "hypnohub": GelbooruV02Client,
    "konachan": MoebooruClient, "konachan_net": MoebooruClient, "yandere": MoebooruClient,
    "e621": E621Client, "e926": E621Client, "zerochan": ZerochanClient, "anime_pictures": AnimePicturesClient,
    "sankaku": SankakuClient, "pixiv": PixivClient, "wallhaven": WallhavenClient,
}


def build(settings: SiteSettings):
    return build_client(settings, HttpSettings(), MediaPolicy())


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASS))
def test_every_preset_builds_its_family_client_from_the_name_alone(name):
    needed = {f: CREDENTIALS[f] for f in PRESETS[name].required}
    client = build(SiteSettings(name=name, **needed))
    assert type(client) is EXPECTED_CLASS[name] and client.site == name
    assert client.http.requests_per_second == PRESETS[name].requests_per_second
    assert client.base_url.rstrip("/") == PRESETS[name].base_url


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.required))
def test_a_site_without_its_credentials_is_skipped_with_the_fix(name):
    with pytest.raises(MissingCredentials) as raised:
        build(SiteSettings(name=name))
    message = str(raised.value)
    for field_name in PRESETS[name].required:
        assert field_name in message and credential_env_vars(name)[field_name] in message
    assert "skipped" in message


def test_build_clients_skips_disabled_and_uncredentialed_sites_and_refuses_duplicates():
    sites = [SiteSettings("danbooru"), SiteSettings("gelbooru"), SiteSettings("pixiv"),
             SiteSettings("yandere", enabled=False), SiteSettings("e621", login="alice", api_key="k")]
    clients, skipped = build_clients(sites, HttpSettings(), MediaPolicy())
    assert sorted(clients) == ["danbooru", "e621"]
    assert len(skipped) == 2 and "gelbooru" in skipped[0] and "refresh_token" in skipped[1]
    with pytest.raises(ValueError, match="more than once"):
        build_clients([SiteSettings("danbooru"), SiteSettings("danbooru")], HttpSettings(), MediaPolicy())


def test_custom_sites_need_api_and_base_url():
    client = build(SiteSettings("mybooru", api="danbooru", base_url="https://booru.example.org"))
    assert isinstance(client, DanbooruClient) and client.http.allowed_hosts == {"booru.example.org"}
    with pytest.raises(ValueError, match="give its api"):
        build(SiteSettings("mybooru"))
    with pytest.raises(ValueError, match="unknown api 'philomena'"):
        build(SiteSettings("mybooru", api="philomena", base_url="https://x.example"))


def test_presets_set_allowed_hosts_and_user_agents_that_name_the_user():
    danbooru = build(SiteSettings("danbooru", base_url="http://127.0.0.1:9"))
    assert danbooru.http.allowed_hosts == {"127.0.0.1", ".donmai.us"}
    zerochan = build(SiteSettings("zerochan", login="alice"))
    assert zerochan.http.user_agent.endswith(" - alice")
    e621 = build(SiteSettings("e621", login="alice", api_key="k"))
    assert e621.http.user_agent.endswith("(by alice on e621)")


def test_secrets_stay_out_of_reprs():
    settings = SiteSettings("e621", login="alice", api_key="k3y-secret", refresh_token="refresh-secret")
    assert "k3y-secret" not in repr(settings) and "refresh-secret" not in repr(settings)


def test_local_folder_site_needs_a_folder(tmp_path):
    client = build(SiteSettings("my_pictures", api="local_folder", folder=str(tmp_path)))
    assert isinstance(client, LocalFolderClient)
    with pytest.raises(ValueError, match="needs folder"):
        build(SiteSettings("local"))


def test_image_sites_resource_builds_clients_and_reports_skipped_sites(monkeypatch):
    monkeypatch.setenv("GELBOORU_USER_ID", "7")
    monkeypatch.setenv("GELBOORU_API_KEY", "gel-secret")
    monkeypatch.delenv("PIXIV_REFRESH_TOKEN", raising=False)
    gelbooru = site_from_env("gelbooru")
    assert isinstance(gelbooru.api_key, dg.EnvVar) and gelbooru.api_key.env_var_name == "GELBOORU_API_KEY"
    sites = ImageSites(sites=[SiteConfig(name="danbooru"), gelbooru, site_from_env("pixiv")],
                       min_side=0, animated="first_frame")
    with dg.build_resources({"image_sites": sites}) as resources:
        clients, skipped = resources.image_sites.build()
    assert sorted(clients) == ["danbooru", "gelbooru"]
    assert clients["gelbooru"]._credentials == {"user_id": "7", "api_key": "gel-secret"}
    assert clients["danbooru"].media == MediaPolicy(min_side=None, animated="first_frame")
    assert len(skipped) == 1 and "PIXIV_REFRESH_TOKEN" in skipped[0]
    with dg.build_resources({"image_sites": ImageSites(sites=[SiteConfig(name="pixiv")])}) as resources:
        with pytest.raises(ValueError, match="(?s)no image site can be used.*refresh_token"):
            resources.image_sites.build()
