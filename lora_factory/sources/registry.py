"""Which client speaks to which site: API families, per-site presets, and building the
clients of a configuration (skipping, with a clear message, sites that lack credentials).

`SiteSettings(name="gelbooru", user_id=..., api_key=...)` is enough for a known site: the
preset gives its API family, base URL, the hosts its files come from and its polite rate.
Any other name needs `api` and `base_url` (for instance a second Danbooru-API site).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping
from urllib.parse import urlsplit

from lora_factory.sources.anime_pictures import AnimePicturesClient
from lora_factory.sources.base import MediaPolicy, SiteClient
from lora_factory.sources.danbooru import DanbooruClient
from lora_factory.sources.e621 import E621Client
from lora_factory.sources.gelbooru import GelbooruClient, GelbooruV02Client
from lora_factory.sources.http import DEFAULT_USER_AGENT, PoliteHttpClient
from lora_factory.sources.local_folder import LocalFolderClient
from lora_factory.sources.moebooru import MoebooruClient
from lora_factory.sources.pixiv import PixivClient
from lora_factory.sources.sankaku import SankakuClient
from lora_factory.sources.wallhaven import WallhavenClient
from lora_factory.sources.zerochan import ZerochanClient

CREDENTIAL_FIELDS = ("login", "api_key", "user_id", "password", "refresh_token")


@dataclass(frozen=True)
class SitePreset:
    api: str  # the client family
    base_url: str
    hosts: tuple[str, ...] = ()  # where files and redirects may come from; ".x.org" = x.org and subdomains
    required: tuple[str, ...] = ()  # credential fields the site cannot be used without
    optional: tuple[str, ...] = ()  # credential fields it uses when given
    requests_per_second: float = 1.0
    file_base_url: str | None = None  # Gelbooru 0.2 sites whose files live on another host
    user_agent_suffix: str = ""  # formatted with the login, for sites that ask to be told who calls


PRESETS: dict[str, SitePreset] = {
    # Danbooru family
    "danbooru": SitePreset("danbooru", "https://danbooru.donmai.us", (".donmai.us",), optional=("login", "api_key")),
    "safebooru_donmai": SitePreset("danbooru", "https://safebooru.donmai.us", (".donmai.us",),
                                   optional=("login", "api_key")),
    "atfbooru": SitePreset("danbooru", "https://booru.allthefallen.moe", (".allthefallen.moe",),
                           optional=("login", "api_key")),
    # Gelbooru API family
    "gelbooru": SitePreset("gelbooru", "https://gelbooru.com", (".gelbooru.com",), required=("user_id", "api_key")),
    "safebooru": SitePreset("gelbooru_v02", "https://safebooru.org", (".safebooru.org",)),
    "rule34": SitePreset("gelbooru_v02", "https://api.rule34.xxx", (".rule34.xxx",), required=("user_id", "api_key"),
                         file_base_url="https://rule34.xxx"),
    "tbib": SitePreset("gelbooru_v02", "https://tbib.org", (".tbib.org",)),
    "xbooru": SitePreset("gelbooru_v02", "https://xbooru.com", (".xbooru.com",), file_base_url="https://img.xbooru.com"),
    "hypnohub": SitePreset("gelbooru_v02", "https://hypnohub.net", (".hypnohub.net",)),
    # Moebooru family
    "konachan": SitePreset("moebooru", "https://konachan.com", (".konachan.com",)),
    "konachan_net": SitePreset("moebooru", "https://konachan.net", (".konachan.net",)),
    "yandere": SitePreset("moebooru", "https://yande.re", (".yande.re",)),
    # e621 / e926 (both serve files from static1.e621.net)
    "e621": SitePreset("e621", "https://e621.net", (".e621.net",), optional=("login", "api_key"),
                       user_agent_suffix=" (by {login} on e621)"),
    "e926": SitePreset("e621", "https://e926.net", (".e926.net", ".e621.net"), optional=("login", "api_key"),
                       user_agent_suffix=" (by {login} on e621)"),
    # Sites of their own
    "zerochan": SitePreset("zerochan", "https://www.zerochan.net", (".zerochan.net",), required=("login",),
                           user_agent_suffix=" - {login}"),
    "anime_pictures": SitePreset("anime_pictures", "https://api.anime-pictures.net", (".anime-pictures.net",),
                                 required=("api_key",)),
    "sankaku": SitePreset("sankaku", "https://sankakuapi.com", ("sankakuapi.com", ".sankakucomplex.com"),
                          optional=("login", "password")),
    "pixiv": SitePreset("pixiv", "https://app-api.pixiv.net", ("app-api.pixiv.net", "oauth.secure.pixiv.net",
                                                               "i.pximg.net"), required=("refresh_token",)),
    "wallhaven": SitePreset("wallhaven", "https://wallhaven.cc", (".wallhaven.cc",), optional=("api_key",),
                            requests_per_second=0.7),  # 45 requests a minute
    "local": SitePreset("local_folder", ""),
}

API_FAMILIES = ("danbooru", "gelbooru", "gelbooru_v02", "moebooru", "e621", "zerochan", "anime_pictures",
                "sankaku", "pixiv", "wallhaven", "local_folder")


class MissingCredentials(ValueError):
    """A site that needs credentials has none configured: it is skipped, not fatal."""


@dataclass(frozen=True)
class SiteSettings:
    """One configured site, as plain values (the Dagster resource converts to this)."""

    name: str
    api: str | None = None  # None: the preset's
    base_url: str | None = None
    folder: str | None = None  # local_folder only
    requests_per_second: float | None = None
    enabled: bool = True
    login: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    user_id: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HttpSettings:
    user_agent: str = DEFAULT_USER_AGENT
    timeout_s: float = 30.0
    max_retries: int = 5
    max_download_bytes: int = 50 * 2**20


def credential_env_vars(name: str) -> dict[str, str]:
    """The environment variables this project's docs use for a site's credentials."""
    preset = PRESETS.get(name)
    fields = (preset.required + preset.optional) if preset else CREDENTIAL_FIELDS
    return {f: f"{name.upper()}_{f.upper()}" for f in fields}


def preset_for(settings: SiteSettings) -> SitePreset:
    """The site's preset with the settings' overrides applied; a clear error when incomplete."""
    preset = PRESETS.get(settings.name)
    if preset is None:
        if not settings.api or (settings.api != "local_folder" and not settings.base_url):
            raise ValueError(
                f"site {settings.name!r} is not a known site ({', '.join(sorted(PRESETS))}): "
                f"give its api (one of {', '.join(API_FAMILIES)}) and base_url"
            )
        preset = SitePreset(settings.api, settings.base_url or "")
    if settings.api and settings.api != preset.api:
        preset = replace(preset, api=settings.api)
    if preset.api not in API_FAMILIES:
        raise ValueError(f"site {settings.name!r}: unknown api {preset.api!r}; known: {', '.join(API_FAMILIES)}")
    if settings.base_url:
        preset = replace(preset, base_url=settings.base_url)
    if settings.requests_per_second is not None:
        preset = replace(preset, requests_per_second=settings.requests_per_second)
    missing = [f for f in preset.required if not getattr(settings, f)]
    if missing:
        env = credential_env_vars(settings.name)
        raise MissingCredentials(
            f"site {settings.name!r} skipped: it needs {' and '.join(missing)}; set "
            + ", ".join(f"{f}=dg.EnvVar({env.get(f, f.upper())!r})" for f in missing)
            + " in its SiteConfig"
        )
    return preset


def build_client(settings: SiteSettings, http: HttpSettings, media: MediaPolicy) -> SiteClient:
    """The client for one enabled site. Raises MissingCredentials or ValueError."""
    preset = preset_for(settings)
    if preset.api == "local_folder":
        if not settings.folder:
            raise ValueError(f"site {settings.name!r}: a local_folder site needs folder: <path>")
        return LocalFolderClient(settings.name, settings.folder, media, max_file_bytes=http.max_download_bytes)
    base_host = urlsplit(preset.base_url).hostname
    if urlsplit(preset.base_url).scheme not in ("http", "https") or not base_host:
        raise ValueError(f"site {settings.name!r}: base_url must be an http(s) URL, got {preset.base_url!r}")
    hosts = {base_host, *preset.hosts}
    if preset.file_base_url:
        hosts.add(urlsplit(preset.file_base_url).hostname or "")
    user_agent = http.user_agent
    if preset.user_agent_suffix and settings.login:
        user_agent += preset.user_agent_suffix.format(login=settings.login)
    client_http = PoliteHttpClient(
        user_agent=user_agent,
        requests_per_second=preset.requests_per_second,
        max_retries=http.max_retries,
        timeout_s=http.timeout_s,
        max_download_bytes=http.max_download_bytes,
        allowed_hosts=hosts,
    )
    return _BUILDERS[preset.api](settings, preset, client_http, media)


def build_clients(
    sites: list[SiteSettings], http: HttpSettings, media: MediaPolicy
) -> tuple[dict[str, SiteClient], list[str]]:
    """Clients of the enabled sites, and one message per site skipped for lack of credentials."""
    names = [s.name for s in sites]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"site name(s) {repeated} are configured more than once; give each site a distinct name")
    clients: dict[str, SiteClient] = {}
    skipped: list[str] = []
    for settings in sites:
        if not settings.enabled:
            continue
        try:
            clients[settings.name] = build_client(settings, http, media)
        except MissingCredentials as exc:
            skipped.append(str(exc))
    return clients, skipped


_Builder = Callable[[SiteSettings, SitePreset, PoliteHttpClient, MediaPolicy], SiteClient]
_BUILDERS: Mapping[str, _Builder] = {
    "danbooru": lambda s, p, h, m: DanbooruClient(s.name, p.base_url, h, s.login, s.api_key, media=m),
    "gelbooru": lambda s, p, h, m: GelbooruClient(s.name, p.base_url, h, s.user_id, s.api_key, media=m,
                                                  file_base_url=p.file_base_url),
    "gelbooru_v02": lambda s, p, h, m: GelbooruV02Client(s.name, p.base_url, h, s.user_id, s.api_key, media=m,
                                                         file_base_url=p.file_base_url),
    "moebooru": lambda s, p, h, m: MoebooruClient(s.name, p.base_url, h, media=m),
    "e621": lambda s, p, h, m: E621Client(s.name, p.base_url, h, s.login, s.api_key, media=m),
    "zerochan": lambda s, p, h, m: ZerochanClient(s.name, p.base_url, h, media=m),
    "anime_pictures": lambda s, p, h, m: AnimePicturesClient(s.name, p.base_url, h, s.api_key or "", media=m),
    "sankaku": lambda s, p, h, m: SankakuClient(s.name, p.base_url, h, s.login, s.password, media=m),
    "pixiv": lambda s, p, h, m: PixivClient(s.name, p.base_url, h, s.refresh_token or "", media=m),
    "wallhaven": lambda s, p, h, m: WallhavenClient(s.name, p.base_url, h, s.api_key, media=m),
}
