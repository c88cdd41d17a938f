"""The loyalty service's tables and queries, one module per area (points,
rules and tiers, sales and the checkout saga). Every table registers on
``metadata``; the migrations' env imports the modules."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# How long a loyalty process keeps the chain's settings it reads on every
# checkout (the points policy, the tier ladder, the earn rules in force)
# before reading them again: a change made through this process is seen at
# once, one made through another replica within this.
SETTINGS_MEMO_SECONDS = 5.0
