"""The flow's S3 access, built from a prefect-aws `S3Bucket` block.

`s3_store` is the one place a block becomes an `S3Store`: the flow, the CLI and
provisioning all call it. It lays the project's client configuration
(`invoiceflow.storage.S3_CLIENT_SETTINGS`: botocore's `standard` retries, a pool sized
for fan-out) under whatever the block's own `AwsClientParameters.config` says, so a
bucket block a user saved by hand, with no retry settings, still gets them; settings
the user did choose win.

Every session the block hands out (`get_boto3_session`) reads and parses S3's service
model, endpoint rules and partitions again: ~0.2 s of CPU before a run's first request.
The flow's sessions share one botocore loader instead, which `start_loading_s3_models`
fills on a thread as Prefect loads the flow (`flows/tasks.py`, `warm_up`), so the
client is built in ~15 ms.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.loaders import Loader, create_loader
from prefect_aws import S3Bucket

from invoiceflow.storage import S3Store, client_config

_MODELS: Loader = create_loader()  # caches what it loads (botocore's `instance_cache`)
_MODELS_LOADING = threading.Lock()  # one thread loads them; the others wait and share
_models_started = threading.Event()


def s3_store(bucket: S3Bucket) -> S3Store:
    credentials = bucket.credentials
    params = credentials.aws_client_parameters.get_params_override()
    if credentials.region_name is not None:
        params["region_name"] = credentials.region_name
    ours = client_config(endpoint_url=params.get("endpoint_url"))
    params["config"] = ours.merge(params["config"]) if "config" in params else ours
    client = _s3_client(credentials.get_boto3_session(), params)
    return S3Store(client, bucket.bucket_name)


def start_loading_s3_models() -> None:
    """Read S3's service model and endpoint rules into the loader the flow's sessions
    share, on a thread of its own, once per process; `s3_store` waits for it."""
    if not _models_started.is_set():
        _models_started.set()
        threading.Thread(target=_load_s3_models, name="s3-models", daemon=True).start()


def _load_s3_models() -> None:
    _s3_client(boto3.session.Session(), {"region_name": "us-east-1"})


def _s3_client(session: boto3.session.Session, params: dict[str, Any]) -> Any:
    session._session.register_component("data_loader", _MODELS)
    with _MODELS_LOADING:
        return session.client(service_name="s3", **params)
