"""The campaigns service's tables. It starts with the chassis tables only (outbox,
inbox, idempotency keys); its own arrive with the issue that builds it."""

import sqlalchemy as sa

metadata = sa.MetaData()
