"""The flow's S3 access, built from a prefect-aws `S3Bucket` block.

`s3_store` is the one place a block becomes an `S3Store`: the flow, the CLI and
provisioning all call it. It lays the project's client configuration
(`invoiceflow.storage.S3_CLIENT_SETTINGS`: botocore's `standard` retries, a pool sized
for fan-out) under whatever the block's own `AwsClientParameters.config` says, so a
bucket block a user saved by hand, with no retry settings, still gets them; settings
the user did choose win.
"""

from __future__ import annotations

from prefect_aws import S3Bucket

from invoiceflow.storage import S3Store, client_config


def s3_store(bucket: S3Bucket) -> S3Store:
    credentials = bucket.credentials
    params = credentials.aws_client_parameters.get_params_override()
    if credentials.region_name is not None:
        params["region_name"] = credentials.region_name
    ours = client_config(endpoint_url=params.get("endpoint_url"))
    params["config"] = ours.merge(params["config"]) if "config" in params else ours
    client = credentials.get_boto3_session().client(service_name="s3", **params)
    return S3Store(client, bucket.bucket_name)
