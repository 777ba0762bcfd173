from __future__ import annotations

import os
from typing import Any

import dagster as dg


class SiteConfig(dg.Config):
    """One image site. For a known site (danbooru, gelbooru, yandere, e621, pixiv, ...) the
    name is enough: its API, base URL and polite rate come from the site's preset.
    Credentials should come from environment variables: `login=dg.EnvVar("DANBOORU_LOGIN")`."""

    name: str
    api: str | None = None  # the API family; None: the preset's
    base_url: str | None = None  # None: the preset's
    folder: str | None = None  # for a local_folder site
    requests_per_second: float | None = None  # None: the preset's (1 request/s for most sites)
    enabled: bool = True
    login: str | None = None
    api_key: str | None = None
    user_id: str | None = None
    password: str | None = None
    refresh_token: str | None = None


def site_from_env(name: str, **fields: Any) -> SiteConfig:
    """A SiteConfig whose credentials are read from `<NAME>_<FIELD>` environment variables
    (DANBOORU_LOGIN, GELBOORU_API_KEY, PIXIV_REFRESH_TOKEN, ...) that are set; a site that
    needs a missing one is then skipped with a message instead of failing the run."""
    from lora_factory.sources.registry import credential_env_vars

    for field_name, variable in credential_env_vars(name).items():
        if field_name not in fields and os.environ.get(variable):
            fields[field_name] = dg.EnvVar(variable)
    return SiteConfig(name=name, **fields)


class ImageSites(dg.ConfigurableResource):
    """The sites `raw_scrape` searches, and how files are chosen and checked. Credentials
    come from environment variables (`dg.EnvVar`) and never reach logs, metadata or
    manifests."""

    # Real sites that need no credentials (Danbooru takes optional ones).
    sites: list[SiteConfig] = [{"name": name} for name in ("danbooru", "yandere", "konachan", "safebooru")]
    user_agent: str = "lora_factory/0.1 (character LoRA factory)"
    max_posts_per_tag: int = 200
    timeout_s: float = 30.0
    max_retries: int = 5
    max_download_mb: float = 50.0
    # The smallest rendition whose sides both reach min_side is downloaded (the original
    # when none does); 0 always takes the original.
    min_side: int = 800
    max_pixels: int = 40_000_000  # refused by the declared size, before any download or decoding
    animated: str = "skip"  # animations and videos: "skip", "first_frame", or "frames"
    frame_step: int = 10  # with animated: frames, every frame_step-th frame ...
    max_frames: int = 8  # ... up to max_frames of them, each stored as its own picture

    def site_configs(self) -> list[SiteConfig]:
        """The configured sites; a subclass may fill in what is known only at run time."""
        # Dagster keeps a list default as plain dicts (it cannot hold Config objects).
        return [SiteConfig(**s) if isinstance(s, dict) else s for s in self.sites]

    def build(self) -> tuple[dict, list[str]]:
        """(clients of the enabled sites, one message per site skipped for lack of credentials)."""
        from lora_factory.sources.base import MediaPolicy
        from lora_factory.sources.registry import HttpSettings, SiteSettings, build_clients

        clients, skipped = build_clients(
            [SiteSettings(**site.model_dump()) for site in self.site_configs()],
            HttpSettings(self.user_agent, self.timeout_s, self.max_retries, int(self.max_download_mb * 2**20)),
            MediaPolicy(min_side=self.min_side or None, animated=self.animated, max_pixels=self.max_pixels,
                        frame_step=self.frame_step, max_frames=self.max_frames),
        )
        if not clients:
            reasons = "\n".join(skipped) or "every site is disabled"
            raise ValueError(f"no image site can be used: enable at least one in ImageSites.sites\n{reasons}")
        return clients, skipped

    def clients(self) -> dict:
        return self.build()[0]
