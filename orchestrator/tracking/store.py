"""The tracking store and the questions restorch asks it: where it is (`resolve_uri`), experiments by name,
run searches that page through every result, a sweep's child runs, a run by id or by name.

Searches: MLflow returns at most `max_results` runs a call (1,000 by default) and a token for the next page;
`search_runs` follows the tokens, so a sweep of 5,000 trials is read whole. Filter values: MLflow's filter
syntax has no escapes (a string is whatever stands between its quotes), so `quote` writes a value holding a
' between "..." and any other between '...'; a value holding both cannot be written and is refused with a
ValueError. Filter strings are built by `tag_is`, `name_is` and `has_tag`, not by hand.
"""
from __future__ import annotations

import itertools
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.tracking.keys import PARENT_TAG, SPEC_ARTIFACT

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PAGE_SIZE = 1000  # runs per search call: MLflow's default page
NEWEST_FIRST = ["attributes.start_time DESC"]
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def sqlite_file(uri: str) -> Path | None:
    """The database file of an embedded SQLite store URI (sqlite:///path), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use, absolute: relative SQLite files and plain folders are resolved here,
    in the driver's working directory, not in some worker's."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    database = sqlite_file(uri)
    if database is not None and not database.is_absolute():
        return f"sqlite:///{database.resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def open_store(uri: str) -> None:
    """Connect to the tracking store once: MLflow creates a new SQLite store's schema on first use (about
    3 s), which a sweep does while Ray starts."""
    MlflowClient(uri).search_experiments(max_results=1)


# ------------------------------------------------------------------------------------------------
# experiments


def experiment_id(client: MlflowClient, name: str) -> str | None:
    """The id of experiment `name`, or None if the store has none of that name."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing (on an embedded SQLite store, with its artifacts in
    `mlartifacts/` beside the database; other stores place them themselves)."""
    found = experiment_id(client, name)
    if found is not None:
        return found
    database = sqlite_file(uri)
    artifacts = None if database is None else (database.parent / ARTIFACTS_DIR).as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def _pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every item of an MLflow search, `search(page_token)` returning a page (a list with the next token)."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def _all_experiments(client: MlflowClient) -> list[str]:
    pages = _pages(lambda token: client.search_experiments(max_results=PAGE_SIZE, page_token=token))
    return [experiment.experiment_id for experiment in pages]


# ------------------------------------------------------------------------------------------------
# filters and searches


def quote(value: str) -> str:
    """`value` as a string of MLflow's filter syntax: 'value', or "value" when it holds a '."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both ' and \": MLflow's search filters cannot match it (they have no escapes); "
                     "use a name or path without one of them")


def tag_is(key: str, value: str) -> str:
    return f"tags.`{key}` = {quote(value)}"


def name_is(value: str) -> str:
    return f"attributes.run_name = {quote(value)}"


def has_tag(key: str) -> str:
    return f"tags.`{key}` LIKE '%'"


def search_runs(client: MlflowClient, experiment_ids: list[str] | None = None, where: str = "", *,
                newest_first: bool = False, limit: int | None = None,
                view: int = ViewType.ACTIVE_ONLY) -> Iterator[Run]:
    """Every run matching the filter `where` in these experiments (all of them if None), page by page;
    at most `limit` runs if given."""
    ids = _all_experiments(client) if experiment_ids is None else experiment_ids
    if not ids:
        return iter(())
    size, order = min(PAGE_SIZE, limit or PAGE_SIZE), NEWEST_FIRST if newest_first else None
    runs = _pages(lambda token: client.search_runs(ids, where, view, max_results=size, order_by=order,
                                                   page_token=token))
    return itertools.islice(runs, limit)


def latest_run(client: MlflowClient, tags: dict[str, str], experiment_ids: list[str] | None = None) -> Run | None:
    """The newest run with these tag values (in these experiments, else in any), or None."""
    where = " and ".join(tag_is(key, value) for key, value in tags.items())
    return next(search_runs(client, experiment_ids, where, newest_first=True, limit=1), None)


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Run]:
    """The runs nested under a parent run (a sweep's trials), all of them."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    return list(search_runs(client, [experiment], tag_is(PARENT_TAG, parent_run_id)))


def run_by_id_or_name(client: MlflowClient, reference: str, name_tag: str | None = None) -> Run | None:
    """The run whose id is `reference`, else the newest top-level run (not a trial), in any experiment,
    called `reference`: its run name, or with `name_tag` that tag's value. None if there is neither."""
    if RUN_ID.match(reference):
        try:
            return client.get_run(reference)
        except MlflowException:
            pass
    where = tag_is(name_tag, reference) if name_tag else name_is(reference)
    return next((run for run in search_runs(client, None, where, newest_first=True) if PARENT_TAG not in run.data.tags),
                None)


def model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of registered model `name` (none if there is no such model)."""
    where = f"name = {quote(name)}"
    return list(_pages(lambda token: client.search_model_versions(where, max_results=PAGE_SIZE, page_token=token)))


def logged_spec_text(client: MlflowClient, run_id: str) -> str | None:
    """The spec a sweep's parent run or a job's run logged (SPEC_ARTIFACT), as written; None if it has none."""
    with tempfile.TemporaryDirectory(prefix="restorch-spec-") as folder:
        try:
            return Path(client.download_artifacts(run_id, SPEC_ARTIFACT, folder)).read_text()
        except (MlflowException, OSError):
            return None
