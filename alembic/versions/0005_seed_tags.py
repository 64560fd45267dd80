"""seed default tags and record the data migration

Revision ID: 0005
Revises: 0004
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A data migration: it inserts rows without any uniqueness to lean on, so running it
# twice would show (two audit rows). Tests count these rows to prove exactly-once.

DEFAULT_TAGS = ["news", "howto", "release"]


def upgrade() -> None:
    audit = op.create_table(
        "data_migrations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.String(32), nullable=False),
        sa.Column("note", sa.String(200), nullable=False),
    )
    tags = sa.table("tags", sa.column("name", sa.String))
    op.bulk_insert(tags, [{"name": name} for name in DEFAULT_TAGS])
    op.bulk_insert(audit, [{"revision": "0005", "note": "seeded default tags"}])


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM tags WHERE name IN ('news', 'howto', 'release')"))
    op.drop_table("data_migrations")
