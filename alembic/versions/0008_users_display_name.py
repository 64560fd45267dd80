"""users get a display name

Revision ID: 0008
Revises: 0007
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("display_name", sa.String(100)))


def downgrade() -> None:
    # SQLite >= 3.35 drops a column in place. A batch rebuild of users would fail here:
    # the post_summaries view reads users, and SQLite checks views on the rename.
    op.drop_column("users", "display_name")
