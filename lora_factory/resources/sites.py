from __future__ import annotations

from urllib.parse import urlparse

import dagster as dg

DEMO_BOORU = "demo"


class SiteConfig(dg.Config):
    """One image site. `base_url: demo` is the project's own demo booru, started in-process."""

    name: str
    api: str = "danbooru"
    base_url: str = DEMO_BOORU
    login: str | None = None
    api_key: str | None = None
    requests_per_second: float = 1.0
    enabled: bool = True


class ImageSites(dg.ConfigurableResource):
    """The sites `raw_scrape` searches. Credentials come from environment variables
    (`dg.EnvVar`) and never reach logs, metadata or manifests."""

    # The default is the demo booru on loopback, so it may go faster than a real site.
    sites: list[SiteConfig] = [{"name": "demo", "base_url": DEMO_BOORU, "requests_per_second": 50.0}]
    user_agent: str = "lora_factory/0.1 (character LoRA factory)"
    max_posts_per_tag: int = 200
    timeout_s: float = 30.0
    max_retries: int = 5

    def site_configs(self) -> list[SiteConfig]:
        # Dagster keeps a list default as plain dicts (it cannot hold Config objects).
        return [SiteConfig(**s) if isinstance(s, dict) else s for s in self.sites]

    def clients(self) -> dict:
        from lora_factory.sources.danbooru import DanbooruClient
        from lora_factory.sources.http import PoliteHttpClient

        clients = {}
        for site in self.site_configs():
            if not site.enabled:
                continue
            if site.api != "danbooru":
                raise ValueError(
                    f"site {site.name!r}: api {site.api!r} is not supported yet; "
                    "supported: 'danbooru'"
                )
            base_url = _resolve_base_url(site.base_url)
            http = PoliteHttpClient(
                user_agent=self.user_agent,
                requests_per_second=site.requests_per_second,
                max_retries=self.max_retries,
                timeout_s=self.timeout_s,
                allowed_hosts={urlparse(base_url).hostname},
            )
            clients[site.name] = DanbooruClient(
                site=site.name,
                base_url=base_url,
                http=http,
                login=site.login,
                api_key=site.api_key,
            )
        if not clients:
            raise ValueError("no image site is enabled: enable at least one in ImageSites.sites")
        return clients


def _resolve_base_url(base_url: str) -> str:
    if base_url == DEMO_BOORU:
        from lora_factory.demo.service import demo_booru_url

        return demo_booru_url()
    parsed = urlparse(base_url)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ValueError(f"site base_url {base_url!r} must be an http(s) URL or 'demo'")
    return base_url.rstrip("/")
