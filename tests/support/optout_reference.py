"""Opt-out lists applied in one process, row by row: what data_pipeline/optout.py and the planner
must agree with (a URL entry names that URL exactly; a domain names its host and subdomains)."""

from __future__ import annotations

import urllib.parse

import pyarrow as pa


def named(url: str, urls: set[str], domains: set[str]) -> bool:
    if url in urls:
        return True
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    labels = host.split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


def apply(kept: pa.Table, entries: list[str]) -> tuple[pa.Table, int]:
    """The kept rows no entry names, and how many it named."""
    urls = {e.strip() for e in entries if "://" in e}
    domains = {e.strip().lower().removeprefix("*.") for e in entries if "://" not in e and "." in e}
    mask = [not named(u, urls, domains) for u in kept["url"].to_pylist()]
    return kept.filter(pa.array(mask)), mask.count(False)
