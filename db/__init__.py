"""Winners database (SQLAlchemy). The models arrive with the tuning work; see ARCHITECTURE.md."""
