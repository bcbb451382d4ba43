"""A resilient healthcare ETL on Celery. `celery -A etl_tasks worker` finds `app` here."""

from etl_tasks.celery import app

__all__ = ["app"]
