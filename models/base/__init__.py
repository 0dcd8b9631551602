"""The base modules: every package of unclip imports them, and they import nothing of ours but
each other.

- `storage`: the one storage contract (fsspec URLs, atomic writes and folder commits, retries),
  and the one JSON writer (`strict_json`: no NaN or Infinity, ever).
- `storage_s3`: S3 with botocore's retries and outages named by URL.
- `configlib`: typed configuration from YAML and `key=value` overrides, one-line errors.
- `errors`: the two kinds of failure a user sees (bad input, exit 2; a failed job, exit 1).
- `ports`, `process`: a free TCP port; how a finished command exits without interpreter teardown.

They sit inside models/, the lowest package, only because the repository's top level is fixed:
every package may import models/, and these import nothing of it but each other
(tests/test_layers.py checks that).
"""
