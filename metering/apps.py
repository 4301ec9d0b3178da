from django.apps import AppConfig


class MeteringConfig(AppConfig):
    name = "metering"
    verbose_name = "Usage metering"

    def ready(self):
        from django.db.models.signals import post_migrate

        from . import viewers
        from .check_cache import connect_signals
        from .pricing import load_default_catalog_after_migrate

        post_migrate.connect(load_default_catalog_after_migrate, sender=self)
        connect_signals()
        viewers.connect_signals()
