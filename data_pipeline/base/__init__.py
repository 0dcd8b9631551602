"""The base modules: every package of unclip imports them, and they import nothing of ours but
each other.

- `storage`: the one storage contract (fsspec URLs, atomic writes and folder commits, retries).
- `storage_s3`: S3 with botocore's retries and outages named by URL.
- `configlib`: typed configuration from YAML and `key=value` overrides, one-line errors.
- `errors`: the two kinds of failure a user sees (bad input, exit 2; a failed job, exit 1).
- `ports`, `process`: a free TCP port; how a finished command exits without interpreter teardown.

They sit inside data_pipeline/ only because the repository's top level is fixed; nothing else of
data_pipeline/ may be imported by the packages below it (tests/test_layers.py checks that).
"""
