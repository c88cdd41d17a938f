"""Card programs, cards and their history, and what cards knows of members
and stores.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from chassis.db import BigIntKey, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "card_programs",
        sa.Column("program_id", sa.String(32), primary_key=True),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("form", sa.String(10), nullable=False),
        sa.Column("number_prefix", sa.String(12), nullable=False),
        sa.Column("number_length", sa.SmallInteger, nullable=False),
        sa.Column("luhn", sa.Boolean, nullable=False),
        sa.Column("validity_months", sa.Integer, nullable=False),
        sa.Column("stored_value", sa.Boolean, nullable=False),
        sa.Column("member_discount_bps", sa.Integer, nullable=False),
        sa.Column("holding", sa.String(10), nullable=False),
        sa.Column("max_group_holders", sa.Integer, nullable=False),
        sa.Column("allows_supplementary", sa.Boolean, nullable=False),
        sa.Column("max_supplementary_cards", sa.Integer, nullable=False),
        sa.Column("allows_linking", sa.Boolean, nullable=False),
        sa.Column("partner_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("spread_multiplier", sa.BigInteger, nullable=False),
        sa.Column("spread_offset", sa.BigInteger, nullable=False),
        sa.Column("next_serial", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_card_programs_partner", "card_programs", ["partner_id", "program_id"])
    op.create_table(
        "cards",
        sa.Column("card_id", sa.String(16), primary_key=True),
        sa.Column("card_number", sa.String(19), nullable=False, unique=True),
        sa.Column("program_id", sa.String(32), nullable=False),
        sa.Column("member_id", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(16), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("principal_card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("limit_currency", sa.String(3), nullable=True),
        sa.Column("limit_minor_units", sa.BigInteger, nullable=True),
        sa.Column("linked_card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("replaces_card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("replaced_by_card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("lineage_id", sa.String(16), nullable=False),
        sa.Column("issued_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("issued_by", sa.String(100), nullable=False),
        sa.Column("issued_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("state_changed_at", UTCDateTime, nullable=False),
        sa.Column("state_changed_by", sa.String(100), nullable=False),
        sa.Column("state_store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("state_reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("pin_hash", sa.String(200), nullable=True),
        sa.Column("pin_wrong_tries", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("pin_locked_until", UTCDateTime, nullable=True),
    )
    op.create_index("ix_cards_member", "cards", ["member_id", "issued_at"])
    op.create_index("ix_cards_account", "cards", ["account_id", "issued_at"])
    op.create_index("ix_cards_principal", "cards", ["principal_card_id"])
    op.create_index("ix_cards_expiry", "cards", ["state", "expires_at"])
    op.create_index("ix_cards_lineage", "cards", ["lineage_id"])
    op.create_table(
        "card_history",
        sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
        sa.Column("card_id", sa.String(16), nullable=False),
        sa.Column("lineage_id", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("from_state", sa.String(10), nullable=False, server_default=""),
        sa.Column("to_state", sa.String(10), nullable=False, server_default=""),
        sa.Column("reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("related_card_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("store_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_card_history_lineage", "card_history", ["lineage_id", "seq"])
    op.create_table(
        "known_members",
        sa.Column("member_id", sa.String(16), primary_key=True),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("merged_into", sa.String(16), nullable=False, server_default=""),
        sa.Column("as_of", UTCDateTime, nullable=False),
    )
    op.create_table(
        "known_stores",
        sa.Column("store_id", sa.String(32), primary_key=True),
        sa.Column("region_id", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    for table in ("known_stores", "known_members", "card_history", "cards", "card_programs"):
        op.drop_table(table)
