"""The campaigns service's tables and queries, one module per area
(promotions and coupons, follow-up plans). Every table registers on
``metadata``; the migrations' env imports the modules."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
