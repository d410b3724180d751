"""Make an ``asv publish`` dashboard work without internet access.

asv's ``index.html`` loads jQuery, Flot, Bootstrap and a few small plugins from public CDNs; on a
machine without internet (CI sandboxes, air-gapped benchmark hosts) the page only shows "Can not
determine continental origin of swallow". This rewrites those ``<script>``/``<link>`` tags to local
copies taken from the same releases on the npm registry (``npm pack``, cached between runs):

    python -m fastbn.bench.asv_html .asv/html      # then: asv preview / any static server

The copies come from npm, not the CDNs, so the CDN's subresource-integrity hashes are dropped from
the rewritten tags. When an exact release is not on npm (stupidtable 1.0.1 never was) the
package's newest release is used and reported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass

__all__ = ["AssetError", "make_offline", "cdn_assets", "main"]

# cdnjs library name -> npm package name, where they differ.
_CDNJS_TO_NPM = {"stupidtable": "stupid-table-plugin"}

_URL = r"https://[^\"'\s>]+"
_TAG = re.compile(r"<(script|link)\b[^>]*?(?:src|href)=[\"'](" + _URL + r")[\"'][^>]*>", re.I)


class AssetError(RuntimeError):
    """An asset could not be fetched (no npm, no registry access, file not in the package)."""


@dataclass(frozen=True)
class Asset:
    url: str
    package: str
    version: str
    paths: tuple  # candidate paths inside the npm package, best first


def _local_name(asset: Asset, tgz: str) -> str:
    # Named after the tarball actually used (its version may differ from the one asked for).
    stem = os.path.basename(tgz)[: -len(".tgz")]
    return f"vendor/{stem}/{os.path.basename(asset.paths[0])}"


def _unmin(path: str) -> str:
    return re.sub(r"\.min\.(js|css)$", r".\1", path)


def _parse(url: str) -> Asset | None:
    m = re.fullmatch(r"https://code\.jquery\.com/jquery-([\d.]+)(\.min)?\.js", url)
    if m:
        name = f"dist/jquery{m.group(2) or ''}.js"
        return Asset(url, "jquery", m.group(1), (name, "dist/jquery.js"))
    m = re.fullmatch(r"https://cdnjs\.cloudflare\.com/ajax/libs/([^/]+)/([^/]+)/(.+)", url)
    if m:
        lib, ver, path = m.groups()
        return Asset(url, _CDNJS_TO_NPM.get(lib, lib), ver, (path, _unmin(path)))
    m = re.fullmatch(r"https://cdn\.jsdelivr\.net/npm/((?:@[^/]+/)?[^/@]+)@([^/]+)/(.+)", url)
    if m:
        pkg, ver, path = m.groups()
        return Asset(url, pkg, ver, (path, _unmin(path)))
    return None


def cdn_assets(html: str) -> list[Asset]:
    """The CDN scripts and stylesheets an asv page loads, as npm (package, version, path)."""
    out = []
    for _tag, url in _TAG.findall(html):
        a = _parse(url)
        if a is not None and a not in out:
            out.append(a)
    return out


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastbn", "asv-www")


def _npm_pack(package: str, version: str | None, cache: str) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError("npm is not installed (needed to fetch the dashboard's JavaScript)")
    spec = f"{package}@{version}" if version else package
    try:
        proc = subprocess.run([npm, "pack", spec, "--pack-destination", cache,
                               "--loglevel=error"],
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        raise AssetError(f"npm pack {spec} timed out") from None
    if proc.returncode != 0:
        raise AssetError(f"npm pack {spec} failed: {proc.stderr.strip()[-400:]}")
    name = proc.stdout.strip().splitlines()[-1].strip()
    path = os.path.join(cache, name)
    if not os.path.isfile(path):
        raise AssetError(f"npm pack {spec} did not produce {path}")
    return path


def _tarball(asset: Asset, cache: str, log) -> str:
    os.makedirs(cache, exist_ok=True)
    stem = asset.package.lstrip("@").replace("/", "-")
    exact = os.path.join(cache, f"{stem}-{asset.version}.tgz")
    if os.path.isfile(exact):
        return exact
    try:
        return _npm_pack(asset.package, asset.version, cache)
    except AssetError as first:
        if "ETARGET" not in str(first) and "No matching version" not in str(first):
            raise
    path = _npm_pack(asset.package, None, cache)  # the release asked for was never published
    log(f"note: {asset.package}@{asset.version} is not on npm; using {os.path.basename(path)}")
    return path


def _extract(asset: Asset, tgz: str) -> bytes:
    with tarfile.open(tgz, "r:gz") as tf:
        members = {m.name.split("/", 1)[1]: m for m in tf.getmembers()
                   if m.isfile() and "/" in m.name}
        for cand in asset.paths:
            m = members.get(cand)
            if m is None:  # e.g. cdnjs serves flot's files from the package root, minified
                base = os.path.basename(cand)
                hits = sorted((k for k in members if os.path.basename(k) == base), key=len)
                m = members[hits[0]] if hits else None
            if m is not None:
                return tf.extractfile(m).read()
    raise AssetError(f"{asset.url}: none of {asset.paths} is in {os.path.basename(tgz)}")


def make_offline(html_dir: str, *, cache_dir: str | None = None, log=None) -> list[str]:
    """Rewrite every ``*.html`` in ``html_dir`` to load its CDN assets from ``html_dir/vendor``.

    Returns the URLs replaced. Raises :class:`AssetError` when an asset cannot be fetched, leaving
    the pages untouched.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cache = cache_dir or default_cache_dir()
    pages = [os.path.join(html_dir, f) for f in sorted(os.listdir(html_dir)) if f.endswith(".html")]
    texts = {}
    assets: list[Asset] = []
    for p in pages:
        with open(p, encoding="utf-8") as fh:
            texts[p] = fh.read()
        for a in cdn_assets(texts[p]):
            if a not in assets:
                assets.append(a)
    tarballs = {a: _tarball(a, cache, log) for a in assets}
    blobs = {a: _extract(a, tgz) for a, tgz in tarballs.items()}  # all or nothing
    local = {a: _local_name(a, tgz) for a, tgz in tarballs.items()}
    for a, data in blobs.items():
        dest = os.path.join(html_dir, local[a])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as fh:
            fh.write(data)
    by_url = {a.url: a for a in assets}

    def swap(m: re.Match) -> str:
        url = m.group(2)
        a = by_url.get(url)
        if a is None:
            return m.group(0)
        out = m.group(0).replace(url, local[a])
        # The npm files are not byte-identical to the CDN's, so the CDN's SRI hash cannot apply.
        out = re.sub(r"\s+integrity=([\"']).*?\1", "", out)
        out = re.sub(r"\s+crossorigin=([\"']).*?\1", "", out)
        return out

    for p, text in texts.items():
        new = _TAG.sub(swap, text)
        if new != text:
            with open(p, "w", encoding="utf-8") as fh:
                fh.write(new)
    return [a.url for a in assets]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m fastbn.bench.asv_html HTML_DIR   (e.g. .asv/html after asv "
              "publish)", file=sys.stderr)
        return 2
    try:
        urls = make_offline(argv[0])
    except (AssetError, OSError) as exc:
        print(f"fastbn.bench.asv_html: error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(urls)} CDN assets now served from {os.path.join(argv[0], 'vendor')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
