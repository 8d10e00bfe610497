"""What `restorch serve` lets a submitted spec name: its own storage roots, data roots and tracking servers.

A spec is data from a user; the service never reads or connects to an address it names. At
submission, `ServicePolicy.admit` rewrites the spec so that it holds only what the service allows:

- storage: `{root}/{user}` for one of the service's storage roots (`--storage-root`), or a folder
  inside it; each experiment then lives in `{root}/{user}/{name}`, so no user reaches another's
  folders. The S3 endpoint is the service's (`--s3-endpoint-url`), never the spec's.
- data: every dataset folder inside a data root (`--data-root`); no per-spec cache folder.
- tracking: one of the service's MLflow servers (`--tracking-uri`), the first by default.

Paths and URIs are normalised before any comparison (`//x`, `/./x`, `/y/../x`, `file:///x` and `x/`
are all `/x`), and result pages check the stored experiment again against the current policy
(`check_stored`) before reading anything.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from orchestrator.spec.schema import ExperimentSpec, SpecError, ValSetSpec


def normalise(location: str, key: str) -> str:
    """`location` (an absolute path, file:// URI or scheme://host/path URI) in one canonical spelling;
    SpecError for a relative path, a query, fragment or percent-escape (which could redirect a URI)."""
    if "://" not in location:
        scheme, netloc, path = "", "", location
    else:
        parts = urlsplit(location)
        if parts.query or parts.fragment or "?" in location or "#" in location or "%" in location:
            raise SpecError(f"{key}: {location} has a query, fragment or %-escape; give a plain path or URI")
        scheme, netloc, path = parts.scheme.lower(), parts.netloc.lower(), parts.path
        if scheme == "file":
            if netloc not in ("", "localhost"):
                raise SpecError(f"{key}: {location} names another host; give a path on the cluster's nodes")
            scheme, netloc = "", ""
        elif not netloc:
            raise SpecError(f"{key}: {location} has no host or bucket")
    if not scheme and not path.startswith("/"):
        raise SpecError(f"{key}: {location} is relative; give an absolute path")
    path = re.sub(r"^/+", "/", posixpath.normpath(path or "/"))  # normpath keeps a leading '//'
    return path if not scheme else f"{scheme}://{netloc}{path.rstrip('/')}"


def inside(location: str, root: str) -> bool:
    """Whether the normalised `location` is `root` or below it."""
    return location == root or location.startswith(root.rstrip("/") + "/")


def _normalise_url(url: str, key: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "databricks") or parts.query or parts.fragment:
        raise SpecError(f"{key}: {url} is not an http(s) address")
    return url.rstrip("/")


@dataclass(frozen=True)
class ServicePolicy:
    """The service's storage roots (folders every node mounts, or s3://bucket/prefix), data roots,
    MLflow tracking servers and S3 endpoint; everything normalised."""

    storage_roots: tuple[str, ...]
    data_roots: tuple[str, ...]
    tracking_uris: tuple[str, ...] = ()
    s3_endpoint_url: str | None = None

    @classmethod
    def create(cls, storage_roots: list[str], data_roots: list[str], tracking_uris: list[str] | None = None,
               s3_endpoint_url: str | None = None) -> ServicePolicy:
        if not storage_roots:
            raise ValueError("give the service at least one --storage-root (a folder every node mounts, or s3://BUCKET/PREFIX)")
        return cls(tuple(normalise(root, "--storage-root") for root in storage_roots),
                   tuple(normalise(root, "--data-root") for root in data_roots),
                   tuple(_normalise_url(uri, "--tracking-uri") for uri in tracking_uris or ()),
                   s3_endpoint_url and _normalise_url(s3_endpoint_url, "--s3-endpoint-url"))

    def admit(self, spec: ExperimentSpec, user: str, *, tracked: bool) -> ExperimentSpec:
        """The spec as the service runs it for `user`: storage in the user's prefix, data checked,
        the service's tracking server and S3 endpoint; SpecError naming what is not allowed."""
        storage = spec.storage.model_copy(update=self._storage(spec, user))
        data = spec.data.model_copy(update=self._data(spec))
        tracking = spec.tracking.model_copy(update={"uri": self._tracking(spec.tracking.uri, tracked=tracked)})
        return spec.model_copy(update={"storage": storage, "data": data, "tracking": tracking})

    def _storage(self, spec: ExperimentSpec, user: str) -> dict[str, object]:
        given = spec.storage.endpoint_url
        if given is not None and _normalise_url(given, "storage.endpoint_url") != self.s3_endpoint_url:
            raise SpecError(f"storage.endpoint_url: this service reaches S3 only at "
                            f"{self.s3_endpoint_url or 'AWS'}; leave storage.endpoint_url out")
        prefixes = [f"{root.rstrip('/')}/{user}" for root in self.storage_roots]
        if "path" not in spec.storage.model_fields_set:
            path = prefixes[0]
        else:
            path = normalise(spec.storage.path, "storage.path")
            if path in self.storage_roots:
                path = prefixes[self.storage_roots.index(path)]
            elif not any(inside(path, prefix) for prefix in prefixes):
                raise SpecError(f"storage.path: {spec.storage.path} is outside your storage in this service; leave "
                                f"storage.path out (it is then {prefixes[0]}) or give a folder in {' or '.join(prefixes)}")
        # The operator's storage roots are shared by every node: a root is either a URI or a shared folder.
        return {"path": path, "endpoint_url": self.s3_endpoint_url, "shared": True}

    def _data(self, spec: ExperimentSpec) -> dict[str, object]:
        if spec.data.cache_dir is not None:
            raise SpecError("data.cache_dir: the cluster's nodes keep their own dataset cache; leave data.cache_dir out")
        checked = {}
        for key, folder in spec.data.folders().items():
            path = normalise(folder, key)
            if not any(inside(path, root) for root in self.data_roots):
                roots = ", ".join(self.data_roots) or "none: the service was started without --data-root"
                raise SpecError(f"{key}: {folder} is outside the data folders of this service ({roots})")
            checked[key] = path
        benchmarks = spec.data.val_benchmarks
        val = {name: ValSetSpec(benchmark=benchmarks[name], path=checked[f"data.val.{name}"]) if name in benchmarks
               else checked[f"data.val.{name}"] for name in spec.data.val_sets} or checked["data.val"]
        return {"train": checked["data.train"], "val": val}

    def _tracking(self, uri: str | None, *, tracked: bool) -> str | None:
        if uri is None:
            if tracked and not self.tracking_uris:
                raise SpecError("tracking: this service has no MLflow server (restorch serve --tracking-uri): it "
                                "runs train experiments only")
            return self.tracking_uris[0] if self.tracking_uris else None
        if "://" not in uri or _normalise_url(uri, "tracking.uri") not in self.tracking_uris:
            allowed = ", ".join(self.tracking_uris) or "none"
            raise SpecError(f"tracking.uri: {uri} is not a tracking server of this service ({allowed}); leave "
                            "tracking.uri out to use the service's")
        return _normalise_url(uri, "tracking.uri")

    def check_stored(self, spec: ExperimentSpec, user: str) -> None:
        """Refuse to read results of a stored experiment whose storage, S3 endpoint or tracking server
        the service does not (or no longer) allow for `user` (e.g. queued before the policy existed)."""
        path = normalise(spec.storage.path, "storage.path")
        if not any(inside(path, f"{root.rstrip('/')}/{user}") for root in self.storage_roots):
            raise SpecError(f"storage.path: {spec.storage.path} is outside {user}'s storage in this service")
        if spec.storage.endpoint_url != self.s3_endpoint_url:
            raise SpecError("storage.endpoint_url: not this service's S3 endpoint")
        if spec.tracking.uri is not None and spec.tracking.uri not in self.tracking_uris:
            raise SpecError(f"tracking.uri: {spec.tracking.uri} is not a tracking server of this service")
