"""The one MetaData every notify table registers on."""

import sqlalchemy as sa

metadata = sa.MetaData()
