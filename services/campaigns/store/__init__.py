"""The campaigns service's tables and queries, one module per area
(promotions and coupons, follow-up plans). Every table registers on
``metadata``; the migrations' env imports the modules."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# How long a campaigns process keeps the settings it reads on every checkout
# or sale (the promotions in force, the enabled follow-up plans) before
# reading them again: a change made through this process is seen at once,
# one made through another replica within this.
SETTINGS_MEMO_SECONDS = 5.0
