"""view of posts with their author

Revision ID: 0007
Revises: 0006
"""
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Created after the batch rebuild of posts on purpose: SQLite checks views when a
# table is renamed, so rebuilding a table that a view reads fails (in stock Alembic
# too). A later rebuild of posts would drop this view first and recreate it after.

def upgrade() -> None:
    op.execute(
        sa.text(
            "CREATE VIEW post_summaries AS "
            "SELECT posts.id AS post_id, posts.title AS title, users.email AS author "
            "FROM posts JOIN users ON users.id = posts.author_id"
        )
    )


def downgrade() -> None:
    op.execute(sa.text("DROP VIEW post_summaries"))
