"""The loyalty service's tables and queries, one module per area (points,
rules and tiers, sales and the checkout saga). Every table registers on
``metadata``; the migrations' env imports the modules."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
