"""index posts by author and date

Revision ID: 0003
Revises: 0002
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_posts_author_created", "posts", ["author_id", "created_at"])


def downgrade() -> None:
    if op.get_context().dialect.name in ("mysql", "mariadb"):
        # MySQL uses this index for the posts.author_id foreign key and refuses to drop
        # it while no other index can serve: give the key its own index first.
        op.create_index("ix_posts_author_id", "posts", ["author_id"])
    op.drop_index("ix_posts_author_created", table_name="posts")
